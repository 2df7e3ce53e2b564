"""networks/detect.py: a network file's algorithm from its keys, on files written by networks.lora and by
lycoris-lora's own API, and the refusal of a --network_weights file the --network_module cannot load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import train_network
from library.errors import UserError
from library.models.synthetic import build_sd1_components
from networks import detect
from networks.lora import create_network
from tests.conftest import files_under, train_argv


@pytest.fixture(scope="module")
def tiny():
    return build_sd1_components("tiny", seed=0)


class Small(torch.nn.Module):
    """One linear layer, one 3x3 convolution, one LayerNorm: what lycoris' algorithms wrap."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(32, 64)
        self.conv = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.norm = torch.nn.LayerNorm(64)


def lycoris_file(path, algo: str, **kwargs) -> str:
    """A file written by lycoris' own create_lycoris / save_weights (rank 4, alpha 2; conv rank 4, alpha 1)."""
    from lycoris import LycorisNetwork, create_lycoris

    # lycoris keeps its preset in class attributes, which other tests' networks inherit: put them back
    saved = {k: v for k, v in vars(LycorisNetwork).items() if k.isupper()}
    try:
        torch.manual_seed(0)
        network = create_lycoris(Small(), 1.0, linear_dim=4, linear_alpha=2, conv_dim=4, conv_alpha=1, algo=algo,
                                 **kwargs)
        network.apply_to()
        network.save_weights(str(path), None, None)
    finally:
        for key in [k for k in vars(LycorisNetwork) if k.isupper() and k not in saved]:
            delattr(LycorisNetwork, key)
        for key, value in saved.items():
            setattr(LycorisNetwork, key, value)
    return str(path)


def lora_file(comps, path, metadata=None, **kwargs) -> tuple[str, object]:
    network = create_network(1.0, 4, 2.0, None, comps["text_encoder"], comps["unet"], **kwargs)
    network.save_weights(str(path), None, metadata)
    return str(path), network


def test_networks_lora_files(tiny, tmp_path):
    path, net = lora_file(tiny, tmp_path / "lora.safetensors")
    found = detect.describe_file(path)
    assert (found.algo, found.ranks, found.conv_ranks, found.alphas) == ("lora", (4,), (), (2.0,))
    assert (found.text_encoder_layers, found.unet_layers) == (len(net.text_encoder_loras), len(net.unet_loras))
    assert found.layers == {"lora": len(net.loras)}
    assert found.module_hint == "--network_module networks.lora"

    path, net = lora_file(tiny, tmp_path / "locon.safetensors", conv_dim="2", conv_alpha="1")
    found = detect.describe_file(path)
    assert (found.algo, found.ranks, found.conv_ranks, found.alphas) == ("locon", (4,), (2,), (1.0, 2.0))
    assert found.summary() == (f"locon network: {len(net.loras)} layers ({len(net.text_encoder_loras)} text "
                               f"encoder, {len(net.unet_loras)} U-Net), rank 4, conv rank 2, alpha 1/2")


def test_dylora_is_told_apart_by_its_metadata(tiny, tmp_path):
    metadata = {"ss_network_module": "networks.dylora", "ss_network_args": json.dumps({"unit": "2"})}
    path, _ = lora_file(tiny, tmp_path / "dylora.safetensors", metadata)
    found = detect.describe_file(path)
    assert (found.algo, found.unit, found.written_by) == ("dylora", 2, "networks.dylora")
    assert found.module_hint == "--network_module networks.dylora"
    assert found.loads_with("networks.lora", {}) and found.loads_with("lycoris.kohya", {"algo": "locon"})


@pytest.mark.parametrize("algo, kwargs, want, ranks, keys", [
    ("locon", {}, "locon", ((4,), (4,)), {"lora_up.weight", "lora_down.weight", "alpha"}),
    ("loha", {}, "loha", ((4,), ()), {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}),
    ("lokr", {"factor": 4}, "lokr", ((4,), ()), {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"}),
    ("ia3", {}, "ia3", ((), ()), {"weight", "on_input"}),
    ("full", {}, "full", ((), ()), {"diff", "diff_b"}),
    ("glora", {}, "glora", ((4,), ()), {"a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"}),
    ("diag-oft", {}, "diag-oft", ((4,), ()), {"oft_blocks", "alpha"}),
    ("boft", {}, "boft", ((4,), ()), {"oft_blocks", "alpha"}),
])
def test_lycoris_files(tmp_path, algo, kwargs, want, ranks, keys):
    path = lycoris_file(tmp_path / f"{algo}.safetensors", algo, **kwargs)
    found = detect.describe_file(path)
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        assert {key.split(".", 1)[1] for key in f.keys()} <= keys  # the names the registry reads
    row = "lora" if want == "locon" else want
    assert (found.algo, (found.ranks, found.conv_ranks), found.layers) == (want, ranks, {row: 2})
    assert found.loads_with("lycoris.kohya", {"algo": algo})
    assert found.loads_with("networks.lora", {}) is (algo == "locon")


def test_lycoris_extras_only_lycoris_loads(tmp_path):
    dora = detect.describe_file(lycoris_file(tmp_path / "dora.safetensors", "locon", dora_wd=True))
    assert dora.algo == "locon" and dora.sdtune_modules == ()
    assert dora.module_hint == "--network_module lycoris.kohya --network_args algo=locon"
    norm = detect.describe_file(lycoris_file(tmp_path / "norm.safetensors", "loha", train_norm=True))
    assert (norm.algo, norm.layers) == ("loha", {"loha": 2, "norm": 1})
    assert norm.module_hint == "--network_module lycoris.kohya --network_args algo=loha train_norm=True"


def test_shapes_alone_and_unknown_files():
    shapes = {"lora_unet_a.lokr_w1": (4, 4), "lora_unet_a.lokr_w2_a": (16, 8), "lora_te_b.oft_blocks": (2, 3, 4, 4),
              "oft_unet_c.oft_blocks": (16, 4, 4), "emb_params": (2, 768)}
    found = detect.detect_algorithm(shapes)
    assert (found.algo, found.ranks, found.alphas) == ("lokr", (8,), ())
    assert found.layers == {"lokr": 1, "boft": 1, "oft": 1}
    assert (found.text_encoder_layers, found.unet_layers) == (1, 1)
    assert detect.detect_algorithm({"emb_params": (2, 768)}).algo == "unknown"
    oft = detect.detect_algorithm({"oft_unet_c.oft_blocks": (16, 4, 4)})  # sd-scripts' networks.oft
    assert oft.summary() == "oft network: 1 layer, block size 4" and "not part of sdtune" in oft.module_hint


def test_files_mixing_algorithms():
    """A lycoris preset may give some layers another algorithm: networks.lora would load a part only."""
    lora = {f"lora_unet_{n}.lora_{part}.weight": (4, 8) for n in "ab" for part in ("down", "up")}
    mixed = detect.detect_algorithm({**lora, "lora_unet_c.hada_w1_a": (8, 2), "lora_unet_c.hada_w1_b": (2, 8)})
    assert (mixed.algo, mixed.layers, mixed.ranks) == ("lora", {"lora": 2, "loha": 1}, (4,))
    assert not mixed.loads_with("networks.lora", {}) and not mixed.loads_with("lycoris.kohya", {"algo": "lokr"})
    assert mixed.loads_with("lycoris.kohya", {"algo": "loha"}) and mixed.loads_with("lycoris.kohya", {})
    assert mixed.module_hint == "--network_module lycoris.kohya --network_args algo=lora"


def test_wrong_module_for_a_file_is_refused(tmp_path):
    loha = lycoris_file(tmp_path / "loha.safetensors", "loha")
    with pytest.raises(UserError) as error:
        detect.check_weights_module(loha, "networks.lora", {})
    assert str(error.value) == (f"--network_weights {loha}: holds a loha network: 2 layers, rank 4, alpha 1/2; "
                                "--network_module networks.lora cannot load it: use --network_module lycoris.kohya "
                                "--network_args algo=loha")
    with pytest.raises(UserError, match=r"lycoris.kohya \(algo=lokr\) cannot load it: use .* algo=loha$"):
        detect.check_weights_module(loha, "lycoris.kohya", {"algo": "lokr"})
    assert detect.check_weights_module(loha, "lycoris.kohya", {"algo": "LoHa"}).algo == "loha"
    assert detect.check_weights_module(loha, "lycoris.kohya", {}, from_weights=True).algo == "loha"
    assert detect.check_weights_module(loha, "my.own.module", {}).algo == "loha"  # not ours to judge
    assert detect.check_weights_module(str(tmp_path / "missing.safetensors"), "networks.lora", {}) is None
    locon = lycoris_file(tmp_path / "locon.safetensors", "locon")
    assert detect.check_weights_module(locon, "lycoris.kohya", {}).algo == "locon"  # lycoris' default algo
    empty = str(tmp_path / "embedding.safetensors")
    save_file({"emb_params": torch.zeros(2, 32)}, empty)
    with pytest.raises(UserError, match="holds no network layers sdtune recognises; --network_module networks.lora"):
        detect.check_weights_module(empty, "networks.lora", {}, flag="--base_weights")


def test_train_network_refuses_a_loha_file_for_networks_lora(tiny_model_dir, demo_data, tmp_path, capsys):
    loha = lycoris_file(tmp_path / "loha.safetensors", "loha")
    out = tmp_path / "out"
    assert train_network.main(train_argv(tiny_model_dir, demo_data, str(out), "--network_weights", loha)) == 2
    err = capsys.readouterr().err
    assert "holds a loha network" in err and "use --network_module lycoris.kohya --network_args algo=loha" in err
    assert not files_under(out)
