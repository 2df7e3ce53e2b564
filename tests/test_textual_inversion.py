"""train_textual_inversion.py on tiny SD1 / SDXL models: kohya command lines, learning, frozen rows, files
that diffusers' load_textual_inversion reads, and the one-line errors."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import train_textual_inversion
from library import embeddings
from library.config import parse_args
from library.methods import EmbeddingMethod
from library.options import options_for
from library.trainer import Run

TOKEN = "shapetok"


def ti_argv(model: str, data: str, out: str, *extra: str) -> list[str]:
    """A kohya train_textual_inversion command line for the tiny models."""
    return [
        "--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", out,
        "--resolution", "64", "--token_string", TOKEN, "--learning_rate", "1e-2", "--max_train_steps", "4",
        "--train_batch_size", "2", "--seed", "1", "--max_data_loader_n_workers", "0", *extra,
    ]


def _metadata(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def _fixed_loss(run: Run, seed: int = 7) -> float:
    """The training loss of the first batches on fixed noise and timesteps (step_loss draws from torch's RNG)."""
    total = 0.0
    with torch.no_grad():
        for i in range(8):
            torch.manual_seed(seed + i)
            total += run.step_loss(run.dataset[(0, i)]).item()
    return total / 8


def test_sd1_embedding_learns_and_leaves_other_rows_alone(tiny_model_dir, demo_data, tmp_path):
    # The tiny random UNet barely listens to its text: the best any caption does on a batch is about 2 %
    # (see the next test), so the figures here are small but fixed by the seeds.
    argv = ti_argv(tiny_model_dir, demo_data, str(tmp_path / "out"), "--init_word", "red circle",
                   "--num_vectors_per_token", "4", "--caption_prefix", TOKEN, "--cache_latents",
                   "--max_train_steps", "60", "--learning_rate", "0.1")
    run = Run(parse_args(argv, "train_textual_inversion"), EmbeddingMethod)
    encoder, tokenizer = run.family.text_encoders[0], run.family.tokenizers[0]
    ids = run.method.token_ids[0]
    assert tokenizer.convert_ids_to_tokens(ids) == [TOKEN, TOKEN + "1", TOKEN + "2", TOKEN + "3"]
    assert ids == [49408, 49409, 49410, 49411]
    weight = encoder.get_input_embeddings().weight
    assert weight.shape[0] == 49412
    frozen = weight[:49408].detach().clone()
    init_ids = tokenizer("red circle", add_special_tokens=False).input_ids
    assert len(init_ids) == 2
    start = run.method.vectors.emb_params.detach().clone()
    # the init word's tokens cycled over the four vectors: red, circle, red, circle
    assert torch.equal(start, weight[init_ids * 2].float())
    run.prepare()
    run.dataset.set_epoch(0)
    before = _fixed_loss(run)
    losses = run.train()
    after = _fixed_loss(run)
    assert len(losses) == 60
    assert after < before * 0.997, (before, after)  # measured: 1.1265 -> 1.1207
    trained = run.method.vectors.emb_params.detach()
    assert (trained - start).abs().max() > 0.5
    weight = encoder.get_input_embeddings().weight
    assert torch.equal(weight[:49408], frozen)  # bitwise: only the new rows ever change
    assert torch.equal(weight[49408:], trained)  # the encoder's own rows hold the trained vectors
    captions = run.method.captions  # the caption's token stands for all four tokens
    assert captions.expand(f"{TOKEN}, a {TOKEN}x") == f"{TOKEN} {TOKEN}1 {TOKEN}2 {TOKEN}3, a {TOKEN}x"


def test_gradient_reaches_only_the_vectors_and_fits_a_fixed_batch(tiny_model_dir, demo_data, tmp_path):
    argv = ti_argv(tiny_model_dir, demo_data, str(tmp_path / "out"), "--num_vectors_per_token", "4",
                   "--caption_prefix", TOKEN, "--cache_latents", "--train_batch_size", "4")
    run = Run(parse_args(argv, "train_textual_inversion"), EmbeddingMethod)
    run.prepare()
    run.dataset.set_epoch(0)
    batch = run.dataset[(0, 0)]
    optimizer = torch.optim.Adam(run.method.vectors.parameters(), lr=0.05)
    losses = []
    for _ in range(60):
        torch.manual_seed(3)  # the same noise and timesteps every time
        loss = run.step_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    grads = [p for p in run.family.text_encoders[0].parameters() if p.grad is not None]
    assert grads == []  # the encoder's own weights get no gradient at all
    assert losses[-1] < losses[0] * 0.985, (losses[0], losses[-1])  # measured: 1.1864 -> 1.1656
    with torch.no_grad():  # for scale: a caption without the token is no better than an empty one
        torch.manual_seed(3)
        empty = run.step_loss({**batch, "captions": [""] * 4}).item()
    assert abs(empty - losses[0]) < 0.005


def test_sd1_command_line_saves_a_file_diffusers_loads(tiny_model_dir, demo_data, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "out"
    argv = ti_argv(tiny_model_dir, demo_data, str(out), "--num_vectors_per_token", "2", "--init_word", "shape",
                   "--use_object_template", "--save_model_as", "safetensors", "--max_train_epochs", "2",
                   "--train_batch_size", "8", "--save_every_n_epochs", "1")
    assert train_textual_inversion.main(argv) == 0
    # kohya names the files after the token; no epoch file for the last epoch
    assert sorted(os.listdir(out)) == ["dataset_report.json", "dataset_report.txt", f"{TOKEN}-000001.safetensors",
                                       f"{TOKEN}.safetensors"]
    path = out / f"{TOKEN}.safetensors"
    sd = load_file(path)
    assert list(sd) == ["emb_params"] and sd["emb_params"].shape == (2, 32)
    assert sd["emb_params"].dtype == torch.float32
    meta = _metadata(path)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    assert meta["ss_output_name"] == TOKEN and meta["ss_steps"] == "24" and meta["ss_epoch"] == "2"
    assert "ss_network_module" not in meta and len(meta["sshs_model_hash"]) == 64
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, local_files_only=True)
    pipe.load_textual_inversion(str(path), token="<shape>")
    ids = pipe.tokenizer.convert_tokens_to_ids(["<shape>", "<shape>_1"])
    rows = pipe.text_encoder.get_input_embeddings().weight[ids]
    assert torch.equal(rows, sd["emb_params"])
    # the epoch-1 file differs from the last one: training went on
    assert not torch.equal(load_file(out / f"{TOKEN}-000001.safetensors")["emb_params"], sd["emb_params"])


def test_pt_file_and_continuing_from_weights(tiny_model_dir, demo_data, tmp_path):
    out = tmp_path / "a"
    assert train_textual_inversion.main(ti_argv(tiny_model_dir, demo_data, str(out), "--num_vectors_per_token", "2",
                                                "--caption_prefix", TOKEN, "--save_model_as", "pt")) == 0
    saved = torch.load(out / f"{TOKEN}.pt", weights_only=True)
    assert list(saved) == ["emb_params"] and saved["emb_params"].shape == (2, 32)
    # A1111's own .pt layout, with the vector count taken from the file
    a1111 = tmp_path / "a1111.pt"
    torch.save({"string_to_param": {"*": saved["emb_params"]}, "name": "x", "step": 4}, a1111)
    argv = ti_argv(tiny_model_dir, demo_data, str(tmp_path / "b"), "--weights", str(a1111), "--max_train_steps", "1",
                   "--caption_prefix", TOKEN)
    run = Run(parse_args(argv, "train_textual_inversion"), EmbeddingMethod)
    assert run.cfg.num_vectors_per_token == 2
    assert torch.equal(run.method.vectors.emb_params.detach(), saved["emb_params"])
    bad = ti_argv(tiny_model_dir, demo_data, str(tmp_path / "c"), "--weights", str(a1111),
                  "--num_vectors_per_token", "3")
    assert train_textual_inversion.main(bad) == 2
    assert not (tmp_path / "c").exists()


def test_sdxl_embedding_has_clip_l_and_clip_g_and_loads_in_diffusers(tiny_sdxl_dir, demo_data, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "out"
    argv = ti_argv(tiny_sdxl_dir, demo_data, str(out), "--num_vectors_per_token", "2", "--init_word", "shape",
                   "--use_style_template", "--save_model_as", "safetensors", "--output_name", "emb")
    assert train_textual_inversion.main(argv) == 0
    path = out / "emb.safetensors"
    sd = load_file(path)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, local_files_only=True)
    dims = [te.get_input_embeddings().embedding_dim for te in (pipe.text_encoder, pipe.text_encoder_2)]
    assert sorted(sd) == ["clip_g", "clip_l"]
    assert sd["clip_l"].shape == (2, dims[0]) and sd["clip_g"].shape == (2, dims[1])
    assert _metadata(path)["modelspec.architecture"].endswith("/textual-inversion")
    # diffusers' documented way for SDXL: once per encoder
    pipe.load_textual_inversion(sd["clip_l"], token="<s>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(sd["clip_g"], token="<s>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    for key, te, tok in (("clip_l", pipe.text_encoder, pipe.tokenizer), ("clip_g", pipe.text_encoder_2,
                                                                          pipe.tokenizer_2)):
        ids = tok.convert_tokens_to_ids(["<s>", "<s>_1"])
        assert torch.equal(te.get_input_embeddings().weight[ids], sd[key])


def test_sdxl_rows_stay_and_both_encoders_train(tiny_sdxl_dir, demo_data, tmp_path):
    argv = ti_argv(tiny_sdxl_dir, demo_data, str(tmp_path / "out"), "--caption_prefix", TOKEN, "--cache_latents")
    run = Run(parse_args(argv, "train_textual_inversion"), EmbeddingMethod)
    encoders = run.family.text_encoders
    frozen = [te.get_input_embeddings().weight[:49408].detach().clone() for te in encoders]
    start = {k: v.detach().clone() for k, v in run.method.vectors.state_dict().items()}
    run.train()
    for te, rows in zip(encoders, frozen):
        assert torch.equal(te.get_input_embeddings().weight[:49408], rows)
    for key, value in run.method.vectors.state_dict().items():
        assert (value - start[key]).abs().max() > 1e-3, key


@pytest.mark.parametrize("extra, message", [
    (["--token_string", "cat"], "'cat' is already in the vocabulary"),
    (["--init_word", "a red circle", "--num_vectors_per_token", "2"], "is 3 tokens"),
    (["--token_string", ""], "--token_string is required"),
    (["--use_object_template", "--use_style_template"], "exclude each other"),
    (["--caption_dropout_rate", "0.1"], "caption_dropout_rate"),  # kohya's TI does not take it
    (["--network_module", "networks.lora"], "network_module"),
])
def test_errors_are_one_line_and_write_nothing(tiny_model_dir, demo_data, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert train_textual_inversion.main(ti_argv(tiny_model_dir, demo_data, str(out), *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_missing_token_string(tiny_model_dir, demo_data, tmp_path, capsys, monkeypatch):
    import library.trainer

    def no_load(cfg):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(library.trainer, "load_model", no_load)
    argv = [a for a in ti_argv(tiny_model_dir, demo_data, str(tmp_path / "out")) if a not in ("--token_string", TOKEN)]
    assert train_textual_inversion.main(argv) == 2
    assert "--token_string is required" in capsys.readouterr().err


def test_weights_file_formats(tmp_path):
    vectors = torch.randn(3, 8)
    save_file({"emb_params": vectors}, tmp_path / "a.safetensors")
    torch.save({"<tok>": vectors[0]}, tmp_path / "diffusers.bin")  # diffusers: one key, the token
    got = embeddings.vectors_for_encoders(embeddings.read_embedding_file(str(tmp_path / "a.safetensors")), [8], "a")
    assert torch.equal(got[0], vectors)
    got = embeddings.vectors_for_encoders(embeddings.read_embedding_file(str(tmp_path / "diffusers.bin")), [8], "b")
    assert got[0].shape == (1, 8)
    from library.errors import UserError

    with pytest.raises(UserError, match="needs clip_l, clip_g"):
        embeddings.vectors_for_encoders({"emb_params": vectors}, [8, 16], "a")
    with pytest.raises(UserError, match=r"needs \(N, 16\)"):
        embeddings.vectors_for_encoders({"emb_params": vectors}, [16], "a")


def test_caption_rewriting_and_templates():
    strings = embeddings.token_strings("tok", 3)
    assert strings == ["tok", "tok1", "tok2"]
    rewriter = embeddings.CaptionRewriter("tok", strings, None, seed=0)
    # kohya's str.replace would also rewrite "toke"; only the word is expanded
    assert rewriter.caption("a tok, toke, (tok)") == "a tok tok1 tok2, toke, (tok tok1 tok2)"
    templated = embeddings.CaptionRewriter("tok", strings, embeddings.OBJECT_TEMPLATES, seed=0)
    seen = {templated.caption("ignored") for _ in range(200)}
    assert len(embeddings.OBJECT_TEMPLATES) == 27 and len(embeddings.STYLE_TEMPLATES) == 19
    assert seen <= {t.format("tok tok1 tok2") for t in embeddings.OBJECT_TEMPLATES} and len(seen) > 20


def test_option_set_is_kohyas():
    ti, net = options_for("train_textual_inversion"), options_for("train_network")
    own = ["token_string", "init_word", "num_vectors_per_token", "weights", "use_object_template",
           "use_style_template"]
    assert all(name in ti and name not in net for name in own)
    assert {"save_model_as", "no_half_vae", "masked_loss", "prior_loss_weight", "sample_prompts"} <= ti.keys()
    assert not {"caption_dropout_rate", "weighted_captions", "network_module", "text_encoder_lr", "ema"} & ti.keys()


def test_sd2_bf16_keeps_trained_rows_in_fp32_and_samples_use_the_token(tiny_sd2_dir, demo_data, tmp_path):
    out = tmp_path / "out"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{TOKEN} on a table --n blurry --w 64 --h 64 --s 2 --d 5\n")
    argv = ti_argv(tiny_sd2_dir, demo_data, str(out), "--num_vectors_per_token", "2", "--caption_prefix", TOKEN,
                   "--mixed_precision", "bf16", "--max_train_steps", "3", "--sample_prompts", str(prompts),
                   "--sample_at_first", "--sample_every_n_steps", "3", "--save_model_as", "safetensors")
    run = Run(parse_args(argv, "train_textual_inversion"), EmbeddingMethod)
    fam = run.family
    embedding = fam.text_encoders[0].get_input_embeddings()
    assert embedding.weight.dtype == torch.bfloat16 and run.method.vectors.emb_params.dtype == torch.float32
    with torch.no_grad():  # a sample prompt's token is expanded to both tokens before encoding
        wrapped = fam.prompt_embeds(f"a {TOKEN}", "")["prompt_embeds"]
        by_hand = type(fam).prompt_embeds(fam, f"a {TOKEN} {TOKEN}1", "")["prompt_embeds"]
        plain = type(fam).prompt_embeds(fam, f"a {TOKEN}", "")["prompt_embeds"]
    assert torch.equal(wrapped, by_hand) and not torch.equal(wrapped, plain)
    run.train()
    assert run.method.vectors.emb_params.dtype == torch.float32
    samples = sorted(os.listdir(out / "sample"))
    assert len(samples) == 4 and samples[0].startswith(f"{TOKEN}_000003_00_")
    sd = load_file(out / f"{TOKEN}.safetensors")
    assert sd["emb_params"].dtype == torch.float32
    assert sd["emb_params"].shape == (2, embedding.embedding_dim)
    assert _metadata(out / f"{TOKEN}.safetensors")["modelspec.architecture"].startswith("stable-diffusion-v2")


def test_output_config_writes_the_embedding_options(tiny_model_dir, demo_data, tmp_path):
    path = tmp_path / "ti.toml"
    argv = ti_argv(tiny_model_dir, demo_data, str(tmp_path / "out"), "--init_word", "shape", "--output_config",
                   str(path))
    assert train_textual_inversion.main(argv) == 0
    text = path.read_text()
    assert f'token_string = "{TOKEN}"' in text and 'init_word = "shape"' in text
    cfg = parse_args(["--config_file", str(path)], "train_textual_inversion")
    assert (cfg.token_string, cfg.init_word, cfg.learning_rate) == (TOKEN, "shape", 1e-2)


def test_tensorboard_run_is_named_as_kohyas(tiny_model_dir, demo_data, tmp_path):
    logs = tmp_path / "logs"
    argv = ti_argv(tiny_model_dir, demo_data, str(tmp_path / "out"), "--max_train_steps", "1",
                   "--logging_dir", str(logs))
    assert train_textual_inversion.main(argv) == 0
    (run_dir,) = os.listdir(logs)
    assert os.listdir(logs / run_dir) == ["textual_inversion"]
