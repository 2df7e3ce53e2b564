"""Precision and memory options (library/precision.py): fp8 base weights, half networks, the half VAE,
fp16 gradient unscaling, torch.compile, --lowram / --highvram; on the tiny model, asserting numbers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from library import precision
from library.config import parse_args
from library.errors import UserError
from library.methods import NetworkMethod
from library.models.sd1 import SD1Family
from library.trainer import Run
from tests.conftest import train_argv

FP8 = torch.float8_e4m3fn


@pytest.mark.parametrize("extra, message", [
    (["--full_fp16", "--mixed_precision", "bf16"], "--full_fp16 needs --mixed_precision fp16 (it is bf16)"),
    (["--full_bf16"], "--full_bf16 needs --mixed_precision bf16 (it is no)"),
    (["--fp8_base_unet"], "--fp8_base_unet needs --mixed_precision bf16 or fp16"),
    (["--torch_compile", "--dynamo_backend", "nvprims_nvfuser"], "--dynamo_backend nvprims_nvfuser: not available"),
    (["--torch_compile", "--dynamo_backend", "tvm"], "--dynamo_backend tvm needs the tvm package"),
])
def test_refused_combinations(extra, message):
    with pytest.raises(UserError) as info:
        precision.check_options(parse_args(extra))
    assert str(info.value).startswith(message)


def test_inductor_on_cpu_needs_a_compiler(monkeypatch):
    monkeypatch.setattr(precision, "_cxx_compiler", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="inductor on CPU needs a C\\+\\+ compiler"):
        precision.check_options(parse_args(["--torch_compile", "--dynamo_backend", "inductor"]))


def test_fp16_gradients_unscale_after_the_patch():
    def setup():
        param = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
        optimizer = torch.optim.SGD([param], lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
        scaler.scale(torch.ones(1))
        param.grad = torch.full((3,), 8.0, dtype=torch.float16)
        return param, optimizer, scaler

    param, optimizer, scaler = setup()
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        scaler.unscale_(optimizer)
    param, optimizer, scaler = setup()
    precision.allow_fp16_gradients(scaler)
    scaler.step(optimizer)  # grad 8 / scale 4 = 2: 1 - 0.1 x 2
    assert param.tolist() == pytest.approx([0.8] * 3, abs=1e-3)
    param, optimizer, scaler = setup()
    param.grad[0] = math.inf
    precision.allow_fp16_gradients(scaler)
    scaler.step(optimizer)
    scaler.update()  # an inf gradient still skips the step and halves the scale
    assert param.tolist() == [1.0] * 3 and scaler.get_scale() == 2.0


def test_fp8_storage_forward_and_backward_close_to_bf16(tiny_model_dir):
    unet, _, text_encoder, _ = SD1Family.load_folder_components(tiny_model_dir)
    unet.requires_grad_(False).to(torch.bfloat16)
    torch.manual_seed(0)
    x = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16, requires_grad=True)
    t, context = torch.tensor([500]), torch.randn(1, 77, unet.config.cross_attention_dim, dtype=torch.bfloat16)
    reference = unet(x, t, context).sample.float()
    (reference_grad,) = torch.autograd.grad(reference.sum(), x)
    precision.store_in_fp8(unet, torch.bfloat16)
    assert unet.conv_in.weight.dtype == FP8 and unet.time_embedding.linear_1.weight.dtype == FP8
    assert unet.conv_in.bias.dtype == torch.bfloat16 and unet.conv_norm_out.weight.dtype == torch.bfloat16
    out = unet(x, t, context).sample.float()
    (grad,) = torch.autograd.grad(out.sum(), x)  # the backward pass goes through the fp8 layers
    # e4m3 keeps 3 mantissa bits (up to 6% per weight): on this random tiny UNet the output moves by about
    # 10% on average (bf16 weights: 1.4%) and keeps its direction
    for value, ref in ((out, reference), (grad.float(), reference_grad.float())):
        assert (value - ref).abs().mean() < 0.2 * ref.abs().mean()
        assert torch.nn.functional.cosine_similarity(value.flatten(), ref.flatten(), dim=0) > 0.98
    family = SimpleNamespace(unet=unet, text_encoders=[text_encoder.to(torch.bfloat16)])
    precision.store_base_in_fp8(family, SimpleNamespace(fp8_base=False, fp8_base_unet=True), torch.bfloat16)
    assert text_encoder.encoder.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def _train_two_steps(model, data, out, *extra):
    run = Run(parse_args(train_argv(model, data, str(out), "--max_train_steps", "2", *extra)), NetworkMethod)
    step_losses = run.train()
    return step_losses, load_file(str(out / "lora.safetensors")), run


def test_fp8_base_trains_with_a_float32_vae(tiny_model_dir, demo_data, tmp_path):
    step_losses, sd, run = _train_two_steps(tiny_model_dir, demo_data, tmp_path, "--mixed_precision", "bf16",
                                            "--fp8_base", "--no_half_vae")
    fam = run.family
    assert all(math.isfinite(x) for x in step_losses)
    assert fam.unet.down_blocks[0].resnets[0].conv1.weight.dtype == FP8
    assert fam.text_encoders[0].encoder.layers[0].mlp.fc1.weight.dtype == FP8
    assert fam.text_encoders[0].embeddings.token_embedding.weight.dtype == torch.bfloat16
    assert fam.vae.dtype == torch.float32  # --no_half_vae
    assert any(sd[k].abs().sum() > 0 for k in sd if k.endswith("lora_up.weight"))  # the network learned


def test_full_bf16_network_and_half_vae(tiny_model_dir, demo_data, tmp_path):
    step_losses, sd, run = _train_two_steps(tiny_model_dir, demo_data, tmp_path, "--mixed_precision", "bf16",
                                            "--full_bf16")
    assert all(math.isfinite(x) for x in step_losses)
    assert {p.dtype for p in run.network.parameters()} == {torch.bfloat16}
    assert {v.dtype for v in sd.values()} == {torch.bfloat16}  # saved as trained (no --save_precision)
    assert run.family.vae.dtype == torch.bfloat16  # kohya's default: the VAE takes the mixed-precision dtype


def test_torch_compile_eager_lowram_highvram_train_the_same(tiny_model_dir, demo_data, tmp_path):
    plain_losses, plain, _ = _train_two_steps(tiny_model_dir, demo_data, tmp_path / "plain")
    compiled_losses, compiled, run = _train_two_steps(
        tiny_model_dir, demo_data, tmp_path / "compiled", "--torch_compile", "--dynamo_backend", "eager",
        "--lowram", "--highvram")
    assert run.family.unet._compiled_call_impl is not None  # compiled in place: same module, same keys
    # the eager backend runs the same kernels, and on a CPU --lowram and --highvram change nothing
    assert compiled_losses == pytest.approx(plain_losses, rel=1e-6)
    assert compiled.keys() == plain.keys()
    assert all(torch.allclose(compiled[k], plain[k], atol=1e-6) for k in plain)
