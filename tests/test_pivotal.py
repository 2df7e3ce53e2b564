"""train_network.py --embedding_*: a new word's embedding trained with the LoRA (pivotal tuning) on tiny SD1 /
SDXL models: both learn, other rows stay bitwise, the separate and bundled files load in diffusers."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

import train_network
from library.config import parse_args
from library.methods import NetworkMethod
from library.trainer import Run
from tests.conftest import files_under, train_argv

TOKEN = "pivtok"


def pivotal_argv(model, data, out, *extra):
    return train_argv(model, data, str(out), "--embedding_token_string", TOKEN, "--embedding_num_vectors", "2",
                      "--caption_prefix", TOKEN, "--embedding_lr", "0.05", "--cache_latents", *extra)


@pytest.mark.parametrize("unet_only", [False, True])
def test_sd1_lora_and_embedding_train_together(unet_only, tiny_model_dir, demo_data, tmp_path):
    extra = ["--network_train_unet_only"] if unet_only else []
    run = Run(parse_args(pivotal_argv(tiny_model_dir, demo_data, tmp_path / "out", "--embedding_init_word", "red",
                                      *extra), "train_network"), NetworkMethod)
    encoder, tokenizer = run.family.text_encoders[0], run.family.tokenizers[0]
    ids = run.method.embedding.tokens.token_ids[0]
    assert tokenizer.convert_ids_to_tokens(ids) == [TOKEN, TOKEN + "1"] and ids == [49408, 49409]
    frozen = encoder.get_input_embeddings().weight[:49408].detach().clone()
    vectors = run.method.embedding.tokens.vectors
    start = vectors.emb_params.detach().clone()
    red = tokenizer("red", add_special_tokens=False).input_ids
    assert torch.equal(start, frozen[red * 2].float())
    assert run.group_names[-1] == "embedding" and run.optimizer.param_groups[-1]["lr"] == 0.05
    assert run.method.train_text_encoder  # the encoders need gradients for the vectors even U-Net-only
    lora_before = {k: v.clone() for k, v in run.method.network.module.state_dict().items()}
    losses = run.train()
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    weight = encoder.get_input_embeddings().weight
    assert torch.equal(weight[:49408], frozen)  # bitwise
    assert torch.equal(weight[49408:], vectors.emb_params.detach())
    assert (vectors.emb_params - start).abs().max() > 0.05
    lora_after = run.method.network.module.state_dict()
    te_changed = any(not torch.equal(v, lora_before[k]) for k, v in lora_after.items() if k.startswith("lora_te"))
    unet_changed = any(not torch.equal(v, lora_before[k]) for k, v in lora_after.items() if k.startswith("lora_unet"))
    assert unet_changed and te_changed == (not unet_only)
    assert any(k.startswith("lora_te") for k in lora_after) == (not unet_only)


def test_sd1_separate_file_loads_in_diffusers(tiny_model_dir, demo_data, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "out"
    assert train_network.main(pivotal_argv(tiny_model_dir, demo_data, out)) == 0
    assert sorted(os.listdir(out)) == ["dataset_report.json", "dataset_report.txt", "lora.safetensors",
                                       "lora_emb.safetensors"]
    lora, emb = load_file(out / "lora.safetensors"), load_file(out / "lora_emb.safetensors")
    assert not any(k.startswith("bundle_emb") for k in lora)
    assert list(emb) == ["emb_params"] and emb["emb_params"].shape == (2, 32)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, local_files_only=True)
    pipe.load_textual_inversion(str(out / "lora_emb.safetensors"), token="<p>")
    rows = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids(["<p>", "<p>_1"])]
    assert torch.equal(rows, emb["emb_params"])


def test_sd1_bundle_and_continuing_from_it(tiny_model_dir, demo_data, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "out"
    assert train_network.main(pivotal_argv(tiny_model_dir, demo_data, out, "--embedding_save", "bundle")) == 0
    assert sorted(os.listdir(out)) == ["dataset_report.json", "dataset_report.txt", "lora.safetensors"]
    sd = load_file(out / "lora.safetensors")
    bundled = [k for k in sd if k.startswith("bundle_emb.")]
    assert bundled == [f"bundle_emb.{TOKEN}.string_to_param.*"] and sd[bundled[0]].shape == (2, 32)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, local_files_only=True)
    models = {"lora_unet_": pipe.unet, "lora_te_": pipe.text_encoder}
    before = {p: {k: v.clone() for k, v in m.state_dict().items()} for p, m in models.items()}
    # diffusers 0.42 refuses a file with bundled keys ("all LoRA param names contain 'lora'"), as it does
    # A1111's own bundles; without them it consumes every LoRA key of the file
    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
        pipe.load_lora_weights(str(out / "lora.safetensors"))
    pipe.load_lora_weights({k: v for k, v in sd.items() if not k.startswith("bundle_emb.")})
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    for prefix, model in models.items():  # every LoRA module of the file reached the model
        changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[prefix][k])}
        assert len(changed) == len({k.split(".")[0] for k in sd if k.startswith(prefix)}) > 0, prefix
    # continue: --network_weights restores the LoRA, --embedding_weights the bundled vectors
    argv = pivotal_argv(tiny_model_dir, demo_data, tmp_path / "again", "--network_weights",
                        str(out / "lora.safetensors"), "--embedding_weights", str(out / "lora.safetensors"),
                        "--embedding_num_vectors", "2")
    run = Run(parse_args(argv, "train_network"), NetworkMethod)
    assert torch.equal(run.method.embedding.tokens.vectors.emb_params, sd[bundled[0]])
    state = run.method.network.module.state_dict()
    assert all(torch.equal(state[k], sd[k].to(state[k].dtype)) for k in state)


def test_sdxl_both_encoders_and_both_files(tiny_sdxl_dir, demo_data, tmp_path):
    out = tmp_path / "out"
    argv = pivotal_argv(tiny_sdxl_dir, demo_data, out, "--embedding_save", "both", "--network_train_unet_only")
    run = Run(parse_args(argv, "train_network"), NetworkMethod)
    encoders = run.family.text_encoders
    frozen = [te.get_input_embeddings().weight[:49408].detach().clone() for te in encoders]
    start = [v.detach().clone() for v in run.method.embedding.tokens.vectors.vectors()]
    losses = run.train()
    assert all(torch.isfinite(torch.tensor(losses)))
    for te, rows, before, after in zip(encoders, frozen, start, run.method.embedding.tokens.vectors.vectors()):
        assert torch.equal(te.get_input_embeddings().weight[:49408], rows)
        assert (after - before).abs().max() > 0.05
    emb, lora = load_file(out / "lora_emb.safetensors"), load_file(out / "lora.safetensors")
    assert sorted(emb) == ["clip_g", "clip_l"]
    assert torch.equal(lora[f"bundle_emb.{TOKEN}.clip_l"], emb["clip_l"])
    assert torch.equal(lora[f"bundle_emb.{TOKEN}.clip_g"], emb["clip_g"])


@pytest.mark.parametrize("extra, expected", [
    (["--cache_text_encoder_outputs", "--network_train_unet_only"], "--cache_text_encoder_outputs"),
    (["--save_model_as", "ckpt"], "--save_model_as"),
    (["--embedding_num_vectors", "0"], "--embedding_num_vectors"),
    (["--embedding_init_word", "a big red shape"], "--embedding_init_word"),
    (["--embedding_weights", "nowhere.safetensors"], "--embedding_weights"),
])
def test_bad_options_one_line(extra, expected, tiny_model_dir, demo_data, tmp_path, capsys):
    out = tmp_path / "out"
    assert train_network.main(pivotal_argv(tiny_model_dir, demo_data, out, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert files_under(out) == []


@pytest.mark.parametrize("token, expected", [("red", "already in the vocabulary"), ("a.b", "without spaces or dots")])
def test_bad_token(token, expected, tiny_model_dir, demo_data, tmp_path, capsys):
    argv = train_argv(tiny_model_dir, demo_data, str(tmp_path / "out"), "--embedding_token_string", token)
    assert train_network.main(argv) == 2
    assert expected in capsys.readouterr().err


def test_embedding_options_need_the_token(tiny_model_dir, demo_data, tmp_path, capsys):
    argv = train_argv(tiny_model_dir, demo_data, str(tmp_path / "out"), "--embedding_lr", "0.1")
    assert train_network.main(argv) == 2
    assert "--embedding_lr needs --embedding_token_string" in capsys.readouterr().err


def test_old_embedding_files_are_pruned_with_their_saves(tiny_model_dir, demo_data, tmp_path):
    out = tmp_path / "out"
    argv = pivotal_argv(tiny_model_dir, demo_data, out, "--max_train_steps", "12", "--save_every_n_steps", "4",
                        "--save_last_n_steps", "4")
    assert train_network.main(argv) == 0
    saved = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    assert saved == [f"lora{stem}{suffix}.safetensors" for stem in ("-step00000008", "-step00000012", "")
                     for suffix in ("", "_emb")]  # step 4's LoRA and embedding went together
