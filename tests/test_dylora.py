"""networks.dylora and tools/extract_lora_from_dylora.py: the rank draw, which chunk learns, the file format,
training end to end, and the split into fixed-rank files."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import train_network
from library.errors import UserError
from library.models.synthetic import build_sd1_components
from library.saving import precalculate_safetensors_hashes
from networks import dylora, lora
from networks.dylora import DyLoRAModule
from tests.conftest import files_under, train_argv
from tools import extract_lora_from_dylora as extract

torch.set_num_threads(1)

LAYERS = {
    "linear": (lambda: torch.nn.Linear(7, 5), (3, 4, 7)),
    "conv1x1": (lambda: torch.nn.Conv2d(7, 5, 1), (2, 7, 4, 4)),
    "conv3x3_stride2": (lambda: torch.nn.Conv2d(7, 5, 3, stride=2, padding=1), (2, 7, 6, 6)),
}
DIM, UNIT, ALPHA = 6, 2, 3.0


def _dylora_layer(kind: str, **kwargs):
    make, shape = LAYERS[kind]
    torch.manual_seed(0)
    layer = make()
    twin = copy.deepcopy(layer)
    module = DyLoRAModule("lora_x", layer, 1.0, DIM, ALPHA, unit=UNIT, **kwargs)
    for chunk in module.lora_up:
        torch.nn.init.normal_(chunk, std=0.5)
    module.apply_to()
    return module, layer, twin, torch.randn(shape)


def _cut_lora(module: DyLoRAModule, twin: torch.nn.Module, rank: int) -> torch.nn.Module:
    """The plain LoRA layer of the first `rank` ranks with the file's alpha: what the extractor writes."""
    layer = copy.deepcopy(twin)
    cut = lora.LoRAModule("lora_x", layer, 1.0, rank, ALPHA)
    sd = extract.cut_to_rank(module.state_dict(), rank)
    cut.load_state_dict(sd)
    cut.apply_to()
    cut.eval()
    return layer


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_training_forward_is_the_cut_at_the_drawn_rank_and_only_its_chunk_learns(kind):
    module, layer, twin, x = _dylora_layer(kind)
    cuts = {rank: _cut_lora(module, twin, rank)(x) for rank in (2, 4, 6)}
    # the cuts differ, so the output says which rank ran
    assert min((cuts[a] - cuts[b]).abs().max() for a, b in ((2, 4), (4, 6))) > 1e-2
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        module.zero_grad(set_to_none=True)
        out = layer(x)
        (rank,) = [r for r, want in cuts.items() if torch.allclose(out, want, atol=1e-5, rtol=0)]
        seen.add(rank)
        out.square().sum().backward()
        trained = [i for i, chunk in enumerate(module.lora_down) if chunk.grad is not None]
        assert trained == [rank // UNIT - 1]
        assert [i for i, chunk in enumerate(module.lora_up) if chunk.grad is not None] == trained
    assert seen == {2, 4, 6}

    module.eval()  # inference: every rank, alpha / dim, as a LoRA loader applies the file
    torch.testing.assert_close(layer(x), cuts[6], atol=1e-5, rtol=0)


def test_optimizer_moves_only_the_chunk_that_learned():
    """Momentum and weight decay must not move a chunk that took part frozen or not at all."""
    module, layer, _, x = _dylora_layer("linear")
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1, weight_decay=0.5)
    for seed in (0, 1, 2, 3):
        before = [c.detach().clone() for c in (*module.lora_down, *module.lora_up)]
        torch.manual_seed(seed)
        layer(x).square().sum().backward()
        learned = {i for i, c in enumerate((*module.lora_down, *module.lora_up)) if c.grad is not None}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        after = [c.detach() for c in (*module.lora_down, *module.lora_up)]
        moved = {i for i, (a, b) in enumerate(zip(before, after)) if not torch.equal(a, b)}
        assert moved == learned and len(learned) == 2


@pytest.mark.parametrize("knob", ["dropout", "rank_dropout", "module_dropout"])
def test_dropouts_act_in_training_only(knob):
    module, layer, twin, x = _dylora_layer("linear", **{knob: 0.5})
    full = _cut_lora(module, twin, DIM)(x)
    module.eval()
    torch.testing.assert_close(layer(x), full, atol=1e-6, rtol=0)
    module.train()
    torch.manual_seed(0)
    outs = [layer(x) for _ in range(20)]
    cuts = [_cut_lora(module, twin, r)(x) for r in (2, 4, 6)]
    # with dropout some training outputs are none of the plain cuts
    assert any(all((o - c).abs().max() > 1e-4 for c in cuts) for o in outs)


def _network(comps, **kwargs):
    args = {"unit": "2", "conv_dim": "4", "conv_alpha": "1.5", **kwargs}
    net = dylora.create_network(1.0, 6, 2.0, None, comps["text_encoder"], comps["unet"], **args)
    net.apply_to(comps["text_encoder"], comps["unet"])
    torch.manual_seed(5)
    for module in net.loras:
        for chunk in module.lora_up:
            torch.nn.init.normal_(chunk, std=0.05)
    return net


def _outputs(comps):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 49406, (2, 77), generator=g)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        emb = comps["text_encoder"](ids)[0]
        return emb, comps["unet"](latents, torch.tensor([10, 500]), emb).sample


def test_file_is_a_plain_lora_that_reloads_and_merges(tmp_path):
    comps = build_sd1_components("tiny", seed=0)
    net = _network(comps)
    net.eval()
    path = str(tmp_path / "dy.safetensors")
    net.save_weights(path, None, {"ss_network_args": json.dumps({"unit": "2"})})
    emb, out = _outputs(comps)

    saved = load_file(path)
    plain = lora.create_network(1.0, 6, 2.0, None, comps["text_encoder"], comps["unet"], conv_dim="4",
                                conv_alpha="1.5")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in plain.state_dict().items()}
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    module = getattr(net, name)
    assert torch.equal(saved[f"{name}.lora_up.weight"], torch.cat(tuple(module.lora_up), dim=1))
    assert saved[f"{name}.alpha"].item() == 1.5

    # networks.lora, networks.dylora (unit from the file's metadata) and a merge all give the same outputs
    for module in (lora, dylora):
        fresh = build_sd1_components("tiny", seed=0)
        again, _ = module.create_network_from_weights(1.0, path, None, fresh["text_encoder"], fresh["unet"])
        again.apply_to(fresh["text_encoder"], fresh["unet"])
        again.load_weights(path)
        again.eval()
        emb2, out2 = _outputs(fresh)
        assert torch.equal(emb2, emb) and torch.equal(out2, out)
    assert again.unit == 2
    merged = build_sd1_components("tiny", seed=0)
    shaped, sd = dylora.create_network_from_weights(1.0, path, None, merged["text_encoder"], merged["unet"],
                                                    for_inference=True)
    shaped.merge_to(merged["text_encoder"], merged["unet"], sd, None, "cpu")
    emb3, out3 = _outputs(merged)
    torch.testing.assert_close(emb3, emb, atol=1e-5, rtol=0)
    torch.testing.assert_close(out3, out, atol=1e-5, rtol=0)
    # the training state (accelerate saves and loads state_dict strictly) round-trips too
    again.load_state_dict(net.state_dict(), strict=True)


def test_max_norm_bounds_the_full_rank_change():
    comps = build_sd1_components("tiny", seed=0)
    net = _network(comps)
    norms = [float(m.get_weight(1.0).detach().norm()) for m in net.loras]
    bound = sorted(norms)[len(norms) // 2]
    scaled, mean, top = net.apply_max_norm_regularization(bound, "cpu")
    after = [float(m.get_weight(1.0).detach().norm()) for m in net.loras]
    assert scaled == sum(n > bound for n in norms) > 0
    assert top == pytest.approx(bound, rel=1e-5) and max(after) == pytest.approx(bound, rel=1e-5)
    assert mean == pytest.approx(sum(after) / len(after), rel=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"unit": "4"}, "--network_dim 6: must be a positive multiple of --network_args unit=4"),
    ({"unit": "0"}, "unit=0: expected a positive integer"),
    ({"conv_dim": "3"}, "conv_dim 3: must be a positive multiple of --network_args unit=2"),
    ({"block_dims": "1"}, "unknown key 'block_dims'"),
])
def test_network_args_errors(kwargs, message):
    comps = build_sd1_components("tiny", seed=0)
    with pytest.raises(UserError, match=message):
        _network(comps, **kwargs)


def test_file_rank_not_a_multiple_of_unit(tmp_path):
    comps = build_sd1_components("tiny", seed=0)
    path = str(tmp_path / "r6.safetensors")
    _network(comps).save_weights(path, None, None)
    with pytest.raises(UserError, match=r"r6.safetensors: lora_te_\w+ has rank 6, not a multiple of unit=4"):
        dylora.create_network_from_weights(1.0, path, None, comps["text_encoder"], comps["unet"], unit="4")


# --- end to end -----------------------------------------------------------------------------------------

DYLORA = ("--network_module", "networks.dylora", "--network_dim", "6", "--network_args", "unit=2", "conv_dim=4")
TWO_STEPS = ("--max_train_steps", "2")


@pytest.fixture(scope="module")
def trained(tiny_model_dir, demo_data, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("dylora")
    assert train_network.main(train_argv(tiny_model_dir, demo_data, str(out), *DYLORA, *TWO_STEPS)) == 0
    return str(out / "lora.safetensors")


def test_train_network_writes_a_dylora(trained):
    with safe_open(trained, "pt") as handle:
        meta = handle.metadata()
    assert meta["ss_network_module"] == "networks.dylora" and meta["ss_network_dim"] == "6"
    assert json.loads(meta["ss_network_args"])["unit"] == "2"
    sd = load_file(trained)
    assert len(sd) == 91 * 3
    learned = []
    for key, up in sd.items():
        if key.endswith("lora_up.weight"):
            # two steps: each layer's first unit-sized chunks learned at most twice, the others are still 0
            learned.append(sum(bool(c.abs().sum()) for c in up.flatten(1).split(2, dim=1)))
    assert 0 < min(learned) and max(learned) <= 2 and learned.count(1) > 0


def test_gradient_checkpointing_replays_the_rank_draw(tiny_model_dir, demo_data, tmp_path, trained):
    out = tmp_path / "ckpt"
    argv = train_argv(tiny_model_dir, demo_data, str(out), *DYLORA, *TWO_STEPS, "--gradient_checkpointing")
    assert train_network.main(argv) == 0
    a, b = load_file(trained), load_file(str(out / "lora.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)


def test_resume_draws_the_same_ranks(tiny_model_dir, demo_data, tmp_path):
    """The rank draws come from torch's RNG, which a training state saves: a resumed run is bitwise the same."""
    longer = (*DYLORA, "--max_train_steps", "3")  # the state of step 2, then one more step
    a, b = tmp_path / "a", tmp_path / "b"
    assert train_network.main(train_argv(tiny_model_dir, demo_data, str(a), *longer, "--save_every_n_steps", "2",
                                         "--save_state")) == 0
    state = str(a / "lora-step00000002-state")
    assert train_network.main(train_argv(tiny_model_dir, demo_data, str(b), *longer, "--resume", state)) == 0
    first, resumed = load_file(str(a / "lora.safetensors")), load_file(str(b / "lora.safetensors"))
    assert first.keys() == resumed.keys() and all(torch.equal(first[k], resumed[k]) for k in first)


def test_extract_writes_the_first_ranks(trained, tmp_path):
    save_to = str(tmp_path / "cut.safetensors")
    assert extract.main(["--model", trained, "--save_to", save_to, "--unit", "2"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["cut-0002.safetensors", "cut-0004.safetensors"]
    source = load_file(trained)
    with safe_open(trained, "pt") as handle:
        source_meta = handle.metadata()
    for rank in (2, 4):
        path = str(tmp_path / f"cut-{rank:04d}.safetensors")
        cut = load_file(path)
        assert cut.keys() == source.keys()
        for key, value in source.items():
            if key.endswith("lora_down.weight"):
                value = value[:rank]
            elif key.endswith("lora_up.weight"):
                value = value[:, :rank]
            assert torch.equal(cut[key], value), key  # conv layers of rank 4 are whole in the rank-4 file
        with safe_open(path, "pt") as handle:
            meta = handle.metadata()
        assert meta["ss_network_dim"] == str(rank) and meta["ss_network_alpha"] == source_meta["ss_network_alpha"]
        assert meta["ss_training_comment"].startswith(f"split from DyLoRA, rank 6 to {rank}; ")
        assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == precalculate_safetensors_hashes(cut, meta)


@pytest.mark.parametrize("args, message", [
    (["--unit", "6"], "--unit 6: the file's rank is 6, so there is no smaller rank to cut out"),
    (["--unit", "0"], "--unit 0: give the rank step"),
    (["--unit", "2", "--model", "missing.safetensors"], "--model missing.safetensors: file not found"),
    (["--unit", "2", "--save_to", "x.txt"], "--save_to x.txt: give a file name ending in .safetensors"),
    (["--unit", "2", "--model", "FOREIGN"], "not a LoRA / DyLoRA file (key w.hada_w1_a)"),
])
def test_extract_errors_write_nothing(trained, tmp_path, capsys, args, message):
    foreign = str(tmp_path / "in" / "loha.safetensors")
    os.makedirs(os.path.dirname(foreign))
    save_file({"w.hada_w1_a": torch.zeros(2, 2)}, foreign)
    argv = ["--model", trained, "--save_to", str(tmp_path / "out" / "cut.safetensors"), *args]
    argv = [foreign if a == "FOREIGN" else a for a in argv]
    os.makedirs(tmp_path / "out")
    assert extract.main(argv) == 2
    assert message in capsys.readouterr().err
    assert files_under(tmp_path / "out") == []
