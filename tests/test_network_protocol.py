"""networks.base: the plug-in protocol. A hand-written plug-in with only the required functions trains end to
end; a plug-in that lacks one fails at start naming it; every optional hook has its default."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import train_network
from library.config import parse_args
from library.errors import UserError
from library.methods import NetworkMethod
from library.trainer import Run
from networks.base import PluginModule, PluginNetwork, optimizer_groups
from tests.conftest import files_under, train_argv


class OffsetNetwork(torch.nn.Module):
    """The least a plug-in can be: a learnt offset added to the output of each U-Net attention query layer,
    with only the four required methods, and kohya's older two-argument, list-only optimizer params."""

    def __init__(self, unet):
        super().__init__()
        self.targets = {name.replace(".", "_"): m for name, m in unet.named_modules() if name.endswith("to_q")}
        self.offsets = torch.nn.ParameterDict({key: torch.nn.Parameter(torch.zeros(m.out_features))
                                               for key, m in self.targets.items()})
        self.lrs_asked = []

    def apply_to(self, text_encoder, unet, apply_text_encoder, apply_unet):
        for key, module in self.targets.items():
            module.register_forward_hook(lambda _m, _inputs, output, key=key: output + self.offsets[key])

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr):
        self.lrs_asked.append((text_encoder_lr, unet_lr))
        return [{"params": self.parameters(), "lr": unet_lr}]  # a generator: the adapter makes it a list

    def save_weights(self, file, dtype, metadata):
        save_file({k: v.detach().to(dtype or v.dtype).contiguous() for k, v in self.state_dict().items()}, file,
                  metadata)

    def load_weights(self, file):
        return self.load_state_dict(load_file(file))


class NoSave(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()

    def apply_to(self, *args):
        pass

    def prepare_optimizer_params(self, *args):
        return []

    def load_weights(self, file):
        pass


def plugin_module(network=OffsetNetwork, from_weights=True) -> types.ModuleType:
    """A network module built in memory: create_network and create_network_from_weights, nothing else."""
    module = types.ModuleType("minimal_plugin")
    module.create_network = lambda multiplier, dim, alpha, vae, te, unet, neuron_dropout=None, **kwargs: (
        network(unet) if network else None)
    if from_weights:
        module.create_network_from_weights = lambda multiplier, file, vae, te, unet, **kwargs: (
            network(unet), load_file(file))
    return module


def _unet_output(unet) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    sample = torch.randn(1, unet.config.in_channels, 8, 8, generator=gen)
    context = torch.randn(1, 4, unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), context).sample


def test_minimal_plugin_trains_saves_and_reloads(tiny_model_dir, demo_data, tmp_path, monkeypatch):
    module = plugin_module()
    monkeypatch.setitem(sys.modules, "minimal_plugin", module)
    out = tmp_path / "out"
    argv = train_argv(tiny_model_dir, demo_data, str(out), "--network_module", "minimal_plugin",
                      "--network_train_unet_only", "--max_train_steps", "2")
    run = Run(parse_args(argv), NetworkMethod)
    assert len(run.train()) == 2
    network = run.method.module
    # the two-argument form gets the learning rates resolved (no --unet_lr: --learning_rate); one group, "unet"
    assert network.lrs_asked == [(1e-3, 1e-3)] and run.group_names == ["unet"]
    offsets = torch.cat([p.detach().flatten() for p in network.parameters()])
    # two AdamW steps from zero move each value by at most 2 lr (x 1.0015 at step 2), the first one by ~lr
    assert 0.9e-3 < offsets.abs().max() <= 2.002e-3

    path = str(out / "lora.safetensors")
    saved = load_file(path)
    assert saved.keys() == network.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in network.state_dict().items())
    with safe_open(path, "pt") as f:
        assert f.metadata()["ss_network_module"] == "minimal_plugin" and f.metadata()["ss_steps"] == "2"

    # the file reloads through the protocol into a fresh U-Net with identical outputs
    fresh = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    plain = _unet_output(fresh)
    reloaded, _ = PluginModule(module, "minimal_plugin").create_network_from_weights(1.0, path, None, None, fresh)
    reloaded.apply_to(None, fresh, False, True)
    reloaded.load_weights(path)
    trained = _unet_output(run.family.unet.to(torch.float32))
    assert torch.equal(_unet_output(fresh), trained) and not torch.equal(plain, trained)


@pytest.mark.parametrize("module, message", [
    (plugin_module(NoSave), "--network_module minimal_plugin: its network (NoSave) has no save_weights; a network "
                            "plug-in must offer apply_to, prepare_optimizer_params, save_weights, load_weights"),
    (plugin_module(None), "--network_module minimal_plugin: create_network returned None"),
    (plugin_module(from_weights=False), "--network_module minimal_plugin: the module has no "
                                        "create_network_from_weights"),
], ids=["no-save_weights", "returns-None", "no-create_network_from_weights"])
def test_incomplete_plugins_fail_at_start(tiny_model_dir, demo_data, tmp_path, monkeypatch, capsys, module, message):
    monkeypatch.setitem(sys.modules, "minimal_plugin", module)
    out = tmp_path / "out"
    argv = train_argv(tiny_model_dir, demo_data, str(out), "--network_module", "minimal_plugin")
    assert train_network.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not files_under(out)


def _linear(*args, **kwargs):
    return torch.nn.Linear(1, 1)


def test_a_network_must_be_a_torch_module():
    with pytest.raises(UserError, match="^--network_module x: create_network returned a dict, not a torch.nn.Module$"):
        PluginNetwork({}, "x")
    module = types.SimpleNamespace(create_network=_linear, create_network_from_weights=_linear)
    with pytest.raises(UserError, match=r"create_network_from_weights returned Linear, not \(network, state dict\)"):
        PluginModule(module, "x").create_network_from_weights(1.0, "f", None, None, None)


# --- optimizer parameter groups, in every form kohya's plug-ins return them ---------------------------

class Groups(OffsetNetwork):
    """prepare_optimizer_params in the current three-argument form, returning what `answer` says."""

    def __init__(self, answer, several=False):
        torch.nn.Module.__init__(self)
        self.a, self.b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
        self.answer, self.asked = answer, []
        if several:
            self.prepare_optimizer_params_with_multiple_te_lrs = self._several

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr):
        self.asked.append((text_encoder_lr, unet_lr, default_lr))
        return self.answer(self)

    def _several(self, text_encoder_lrs, unet_lr, default_lr):
        self.asked.append(("several", text_encoder_lrs, unet_lr, default_lr))
        return self.answer(self)


def test_optimizer_param_forms():
    described = PluginNetwork(Groups(lambda n: ([{"params": [n.a], "lr": 1}, {"params": [n.b]}], ["te", "unet"])), "x")
    groups, names = described.prepare_optimizer_params(None, 2e-4, 1e-3)
    assert [len(g["params"]) for g in groups] == [1, 1] and groups[0]["lr"] == 1 and names == ["te", "unet"]
    assert described.module.asked == [(None, 2e-4, 1e-3)]  # the three-argument form gets them as given

    listed = PluginNetwork(Groups(lambda n: [{"params": iter([n.a, n.b])}]), "x")
    groups, names = listed.prepare_optimizer_params(None, None, 1e-3)
    assert groups[0]["params"] == [listed.module.a, listed.module.b] and names is None

    bare = PluginNetwork(Groups(lambda n: n.parameters()), "x")
    groups, names = bare.prepare_optimizer_params([5e-5, 6e-5], None, 1e-3)
    assert len(groups) == 1 and len(groups[0]["params"]) == 2
    assert bare.module.asked == [(5e-5, None, 1e-3)]  # one lr per encoder, the network takes one: the first

    several = PluginNetwork(Groups(lambda n: [{"params": [n.a]}], several=True), "x")
    several.prepare_optimizer_params([5e-5, 6e-5], 1e-4, 1e-3)
    assert several.module.asked == [("several", [5e-5, 6e-5], 1e-4, 1e-3)]

    # descriptions that do not match the groups are dropped (the method names the groups itself)
    assert optimizer_groups(([{"params": []}], ["a", "b"]), "x")[1] is None
    with pytest.raises(UserError, match="^--network_module x: prepare_optimizer_params must return parameter groups"):
        PluginNetwork(Groups(lambda n: None), "x").prepare_optimizer_params(None, None, 1e-3)


# --- the optional hooks' defaults -------------------------------------------------------------------

def test_defaults_of_a_network_with_required_methods_only(caplog):
    network = PluginNetwork(Groups(lambda n: []), "x")
    inner = network.module
    inner.eval()
    network.on_epoch_start(None, None)
    assert inner.training  # kohya's networks switch to training mode here; the default does it for them
    for call in (lambda: network.prepare_network(None), lambda: network.prepare_grad_etc(None, None),
                 lambda: network.on_step_start(None, None), network.enable_gradient_checkpointing):
        assert call() is None
    assert network.get_trainable_params() == [inner.a, inner.b]
    with caplog.at_level(logging.WARNING):
        network.set_multiplier(1.0)
        network.set_multiplier(0.5)
        network.set_multiplier(0.25)
    assert [r.getMessage() for r in caplog.records] == [
        "--network_module x has no set_multiplier: network_multiplier 0.5 is ignored"]
    assert not network.can_scale_weight_norms and network.text_encoder_layers is None
    with pytest.raises(UserError, match="^--scale_weight_norms: --network_module x has no apply_max_norm_reg"):
        network.apply_max_norm_regularization(1.0, "cpu")
    with pytest.raises(UserError, match="does not list its text_encoder_loras"):
        network.freeze_text_encoder()
    assert not network.is_mergeable()
    with pytest.raises(UserError, match="^--network_module x: its network has no merge_to; it cannot be merged$"):
        network.merge_to(None, None, {}, None, "cpu")


class Full(Groups):
    """Every optional hook, as lycoris' kohya network has them (norms as tensors)."""

    def __init__(self):
        super().__init__(lambda n: [])
        self.text_encoder_loras = [torch.nn.Linear(2, 2)]
        self.seen = []

    def set_multiplier(self, multiplier):
        self.seen.append(("multiplier", multiplier))

    def apply_max_norm_regularization(self, max_norm, device):
        return 3, torch.tensor(0.5), torch.tensor(0.75)

    def is_mergeable(self):
        return False

    def merge_to(self, *args):
        self.seen.append("merge_to")

    def on_epoch_start(self, text_encoder, unet):
        self.seen.append("epoch")


def test_hooks_a_network_has_are_called():
    network = PluginNetwork(Full(), "x")
    network.set_multiplier(0.5)
    network.on_epoch_start(None, None)
    assert network.apply_max_norm_regularization(1.0, "cpu") == (3, 0.5, 0.75)
    assert not network.is_mergeable()  # its own answer wins over having merge_to
    network.merge_to(None, None, {}, None, "cpu")
    assert network.module.seen == [("multiplier", 0.5), "epoch", "merge_to"]
    layer = network.module.text_encoder_loras[0]
    layer.weight.grad = torch.ones_like(layer.weight)
    network.freeze_text_encoder()
    assert not layer.weight.requires_grad and layer.weight.grad is None and network.module.a.requires_grad
