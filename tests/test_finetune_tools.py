"""kohya's fine-tuning preparation tools: merge_captions_to_metadata, merge_dd_tags_to_metadata and
prepare_buckets_latents (library/finetune_prep.py), and `--in_json` training reading what they write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import train_network
from library import caching
from library.config import parse_args
from library.dataset import build_dataset
from library.dataset.images import load_pixels
from library.finetune_prep import bucket_settings, load_vae_family, place_images, prepare_buckets_latents
from library.models.sd1 import SD1Family
from tests.conftest import files_under, train_argv
from tests.test_dataset import write_image, write_text
from tools import merge_captions_to_metadata as merge_captions
from tools import merge_dd_tags_to_metadata as merge_tags
from tools import prepare_buckets_latents as prepare_tool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# image name -> size; the buckets of --max_resolution 128,128 --min_bucket_reso 64 --max_bucket_reso 256
# are (64,256) (64,192) (128,128) (192,64) (256,64)
SIZES = {"a.png": (100, 100), "b.png": (60, 150), "c.jpg": (200, 70)}
BUCKETS = {"a": [128, 128], "b": [64, 192], "c": [192, 64]}  # nearest aspect ratios 1, 1/3, 3
BUCKET_FLAGS = ["--max_resolution", "128,128", "--min_bucket_reso", "64", "--max_bucket_reso", "256"]


@pytest.fixture
def imgs(tmp_path):
    """imgs/ with a, b, c (captions for a and b, tags for a and c) and sub/d.png (caption and tags)."""
    folder = tmp_path / "imgs"
    for i, (name, size) in enumerate(SIZES.items()):
        write_image(str(folder / name), size, value=40 * i)
    write_image(str(folder / "sub" / "d.png"), (64, 64), value=200)
    write_text(str(folder / "a.caption"), "a red square\n")
    write_text(str(folder / "b.caption"), "  a tall one ")
    write_text(str(folder / "a.txt"), "square, red")
    write_text(str(folder / "c.txt"), "wide")
    write_text(str(folder / "sub" / "d.caption"), "deep")
    write_text(str(folder / "sub" / "d.txt"), "nested")
    return folder


def read(path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def test_captions_and_tags_merge_into_one_file(imgs, tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"a": {"train_resolution": [64, 64]}, "gone": {"caption": "kept"}}))
    assert merge_captions.main([str(imgs), str(meta)]) == 0  # out_json exists: it is the input (kohya)
    assert merge_tags.main([str(imgs), str(meta)]) == 0
    assert read(meta) == {
        "a": {"train_resolution": [64, 64], "caption": "a red square", "tags": "square, red"},
        "gone": {"caption": "kept"},
        "b": {"caption": "a tall one"},
        "c": {"tags": "wide"},
    }
    # --in_json is read, out_json written; kohya's misspelt --caption_extention still works
    out = tmp_path / "tags_only.json"
    assert merge_tags.main([str(imgs), str(out), "--in_json", str(meta), "--caption_extension", "caption"]) == 0
    assert read(out)["b"] == {"caption": "a tall one", "tags": "a tall one"}
    assert read(meta)["b"] == {"caption": "a tall one"}
    assert merge_captions.main([str(imgs), str(out), "--caption_extention", ".txt"]) == 0
    assert read(out)["c"] == {"tags": "wide", "caption": "wide"}


def test_full_path_and_recursive_keys(imgs, tmp_path, monkeypatch):
    out = tmp_path / "full.json"
    assert merge_captions.main([str(imgs), str(out), "--full_path", "--recursive"]) == 0
    assert read(out) == {str(imgs / "a.png"): {"caption": "a red square"},
                         str(imgs / "b.png"): {"caption": "a tall one"},
                         str(imgs / "sub" / "d.png"): {"caption": "deep"}}
    flat = tmp_path / "flat.json"
    assert merge_captions.main([str(imgs), str(flat), "--full_path"]) == 0
    assert list(read(flat)) == [str(imgs / "a.png"), str(imgs / "b.png")]
    # keys as written under a relative train_data_dir (kohya's str(Path)): "./imgs/" -> "imgs/a.png"
    monkeypatch.chdir(tmp_path)
    assert merge_tags.main(["./imgs/", "rel.json", "--full_path"]) == 0
    assert read(tmp_path / "rel.json") == {"imgs/a.png": {"tags": "square, red"}, "imgs/c.jpg": {"tags": "wide"}}


@pytest.mark.parametrize("argv, message", [
    (["{imgs}", "{out}", "--recursive"], "--recursive needs --full_path"),
    (["{tmp}/nowhere", "{out}"], "folder not found"),
    (["{imgs}", "{out}", "--in_json", "{tmp}/absent.json"], "--in_json {tmp}/absent.json: file not found"),
    (["{imgs}", "{out}", "--in_json", "{tmp}/bad.json"], "not valid JSON"),
    (["{imgs}", "{tmp}/bad.json"], "not valid JSON"),
    (["{imgs}", "{out}", "--in_json", "{tmp}/list.json"], "expected an object"),
    (["{imgs}", "{out}", "--in_json", "{tmp}/entry.json"], "'a': expected an object"),
])
def test_bad_input_is_one_line_and_writes_nothing(imgs, tmp_path, capsys, argv, message):
    files = {"bad.json": '{"a": {"caption": ', "list.json": "[1, 2]", "entry.json": '{"a": "text"}'}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    before = {name: (tmp_path / name).read_bytes() for name in files}
    names = {"imgs": imgs, "out": tmp_path / "out.json", "tmp": tmp_path}
    assert merge_captions.main([a.format(**names) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message.format(**names) in err
    assert not (tmp_path / "out.json").exists()
    assert {name: (tmp_path / name).read_bytes() for name in files} == before  # inputs untouched
    assert [p for p in files_under(tmp_path) if p.endswith(".tmp")] == []


def test_two_images_with_one_key_are_refused(imgs, tmp_path, capsys):
    write_image(str(imgs / "a.jpg"), (64, 64))
    assert merge_captions.main([str(imgs), str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err
    assert f"{imgs / 'a.jpg'} and {imgs / 'a.png'} have the same metadata key 'a'" in err and err.count("\n") == 1
    assert merge_captions.main([str(imgs), str(tmp_path / "m.json"), "--full_path"]) == 0


def prep_args(imgs, in_json, out_json, model="unused", *extra):
    return prepare_tool.build_parser().parse_args([str(imgs), str(in_json), str(out_json), model,
                                                    *BUCKET_FLAGS, *extra])


@pytest.mark.parametrize("extra, bucket_flags", [
    ([], ["--enable_bucket"]),
    (["--bucket_reso_steps", "32", "--min_bucket_reso", "32"],
     ["--enable_bucket", "--bucket_reso_steps", "32", "--min_bucket_reso", "32"]),
    (["--bucket_no_upscale", "--bucket_reso_steps", "32", "--min_bucket_reso", "32"],
     ["--enable_bucket", "--bucket_no_upscale", "--bucket_reso_steps", "32", "--min_bucket_reso", "32"]),
])
def test_buckets_are_the_ones_the_dataset_computes(imgs, tmp_path, extra, bucket_flags):
    """The tool's buckets equal those of a folder dataset with the same options (a DreamBooth folder of the
    same images), and the training run from train_resolution resizes as that dataset does."""
    args = prep_args(imgs, "in", "out", "m", *extra)
    sizes = {str(imgs / name): size for name, size in SIZES.items()}
    placed = place_images(sizes, bucket_settings(args))
    folder = tmp_path / "db" / "1_x"
    for name, size in SIZES.items():
        write_image(str(folder / name), size)
    cfg = parse_args(["--train_data_dir", str(tmp_path / "db"), "--resolution", "128,128", "--max_bucket_reso", "256",
                      "--min_bucket_reso", "64", *bucket_flags])
    dataset = {os.path.basename(r.path): r for r in build_dataset(cfg).records}
    for path, record in placed.items():
        theirs = dataset[os.path.basename(path)]
        assert record.bucket == theirs.bucket
        if not args.bucket_no_upscale:
            assert record.resized == theirs.resized
    if not extra:
        assert {Path(p).stem: list(r.bucket) for p, r in placed.items()} == BUCKETS
        assert {Path(p).stem: r.resized for p, r in placed.items()} == {"a": (128, 128), "b": (77, 192), "c": (192, 67)}


def test_bucket_no_upscale_numbers(tmp_path):
    args = prep_args(tmp_path, "in", "out", "m", "--bucket_no_upscale")
    placed = place_images({"x.png": (100, 100), "y.png": (200, 70), "z.png": (300, 300)}, bucket_settings(args))
    # within 128x128's area: as is, floored to 64; 300x300 scales to 128x128 first
    assert {p: r.bucket for p, r in placed.items()} == {"x.png": (64, 64), "y.png": (192, 64), "z.png": (128, 128)}
    with pytest.raises(Exception, match="smaller than --bucket_reso_steps 64"):
        place_images({"tiny.png": (40, 300)}, bucket_settings(args))


@pytest.fixture
def captioned(imgs, tmp_path):
    """imgs/ without sub/, and meta.json with captions and tags (the merge tools' output)."""
    for path in files_under(imgs / "sub"):
        os.remove(path)
    os.rmdir(imgs / "sub")
    write_text(str(imgs / "c.caption"), "a wide one")
    meta = tmp_path / "meta.json"
    assert merge_captions.main([str(imgs), str(meta)]) == 0
    assert merge_tags.main([str(imgs), str(meta)]) == 0
    return meta


def test_prepare_writes_buckets_and_the_latents_of_the_bucketed_images(tiny_model_dir, imgs, captioned, tmp_path):
    out = tmp_path / "lat.json"
    args = prep_args(imgs, captioned, out, tiny_model_dir, "--batch_size", "1", "--flip_aug", "--device", "cpu")
    family = load_vae_family(args)
    torch.manual_seed(0)
    result = prepare_buckets_latents(args, family)
    assert (result.encoded, result.added, result.skipped) == (3, 0, [])
    meta = read(out)
    assert {k: v["train_resolution"] for k, v in meta.items()} == BUCKETS
    assert meta["a"] == {"caption": "a red square", "tags": "square, red", "train_resolution": [128, 128]}
    assert read(captioned)["a"] == {"caption": "a red square", "tags": "square, red"}  # the input is untouched
    assert sorted(os.path.basename(p) for p in files_under(imgs) if p.endswith(".npz")) == [
        "a_0100x0100_sd.npz", "b_0060x0150_sd.npz", "c_0200x0070_sd.npz"]
    # the same draws in the tool's order (smallest bucket area first, then path): each mirror, then its image
    placed = place_images({str(imgs / n): s for n, s in SIZES.items()}, bucket_settings(args))
    order = sorted(placed.values(), key=lambda r: (r.bucket[0] * r.bucket[1], r.bucket, r.path))
    cache = caching.make_latent_cache(SimpleNamespace(cache_latents_to_disk=True), family.vae, "sd1")
    assert cache.missing(order) == []
    torch.manual_seed(0)
    for record in order:
        pixels = load_pixels(record.path, record.resized, record.bucket)[None]
        mirrored = family.encode_images(torch.flip(pixels, dims=[3]))[0]  # caching.encode_batch's order
        expected = family.encode_images(pixels)[0]
        assert expected.shape == (4, record.bucket[1] // 8, record.bucket[0] // 8)
        assert torch.allclose(cache.get(record.path), expected, atol=1e-6)
        assert torch.allclose(cache.get(record.path, flipped=True), mirrored, atol=1e-6)


def test_in_json_training_reads_the_prepared_latents_without_encoding(tiny_model_dir, imgs, captioned, tmp_path,
                                                                      monkeypatch):
    out = tmp_path / "lat.json"
    assert prepare_tool.main([str(imgs), str(captioned), str(out), tiny_model_dir, *BUCKET_FLAGS,
                              "--batch_size", "2", "--device", "cpu"]) == 0
    stamps = {p: os.stat(p).st_mtime_ns for p in files_under(imgs) if p.endswith(".npz")}
    assert len(stamps) == 3
    calls = []
    encode = SD1Family.encode_images

    def counted(self, pixels):
        calls.append(pixels.shape[0])
        return encode(self, pixels)

    monkeypatch.setattr(SD1Family, "encode_images", counted)
    # the dataset: buckets from train_resolution, every latent file valid
    cfg = parse_args(["--in_json", str(out), "--train_data_dir", str(imgs), "--cache_latents_to_disk"])
    dataset = build_dataset(cfg)
    assert {Path(r.path).stem: list(r.bucket) for r in dataset.records} == BUCKETS
    family = load_vae_family(SimpleNamespace(model_name_or_path=tiny_model_dir, vae=None, mixed_precision="no",
                                             no_half_vae=False, device="cpu"))
    cache = caching.make_latent_cache(cfg, family.vae, family.name)
    dataset.cache_latents(family.encode_images, 2, cache)
    assert calls == [] and cache.counts["valid"] == 3
    # a whole training run (train_network, as kohya's fine-tuning data) encodes nothing either
    run = tmp_path / "run"
    argv = train_argv(tiny_model_dir, str(imgs), str(run), "--in_json", str(out), "--cache_latents_to_disk",
                      "--max_train_steps", "2", "--train_batch_size", "1")
    assert train_network.main(argv) == 0
    assert calls == [] and os.path.isfile(run / "lora.safetensors")
    assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps
    # --skip_existing keeps valid files; without it every image is encoded again (kohya)
    assert prepare_tool.main([str(imgs), str(out), str(out), tiny_model_dir, *BUCKET_FLAGS, "--skip_existing",
                              "--device", "cpu"]) == 0
    assert calls == [] and {p: os.stat(p).st_mtime_ns for p in stamps} == stamps
    assert prepare_tool.main([str(imgs), str(out), str(out), tiny_model_dir, *BUCKET_FLAGS, "--device", "cpu"]) == 0
    assert calls == [1, 1, 1]  # three buckets, one image each


def test_prepare_bad_input_is_one_line_and_writes_nothing(tiny_model_dir, imgs, captioned, tmp_path, capsys,
                                                          monkeypatch):
    before = captioned.read_bytes()
    cases = [
        ([str(imgs), str(tmp_path / "absent.json"), "o.json", tiny_model_dir], "absent.json: file not found"),
        ([str(tmp_path / "nowhere"), str(captioned), "o.json", tiny_model_dir], "folder not found"),
        ([str(imgs), str(captioned), "o.json", tiny_model_dir, "--recursive"], "--recursive needs --full_path"),
        ([str(imgs), str(captioned), "o.json", tiny_model_dir, "--max_resolution", "128,x"], "--max_resolution"),
        ([str(imgs), str(captioned), "o.json", tiny_model_dir, "--min_bucket_reso", "300"], "--max_resolution"),
        ([str(imgs), str(captioned), "o.json", tiny_model_dir, "--bucket_no_upscale", "--bucket_reso_steps", "8",
          "--min_bucket_reso", "8"], "b.png: bucket [56, 144] is not divisible by 16"),  # the tiny U-Net's 16
        ([str(imgs), str(captioned), "o.json", str(tmp_path / "no_model")], "no_model"),
        ([str(imgs), str(captioned), "o.json", tiny_model_dir, "--alpha_mask", "1"], "not supported yet: --alpha_mask"),
    ]
    monkeypatch.chdir(tmp_path)
    for argv, message in cases:
        assert prepare_tool.main([*argv[:4], *BUCKET_FLAGS, *argv[4:], "--device", "cpu"]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (argv, err)
    assert captioned.read_bytes() == before
    assert not os.path.exists(tmp_path / "o.json")
    assert [p for p in files_under(imgs) if p.endswith(".npz")] == []


@pytest.mark.parametrize("name", ["merge_captions_to_metadata", "merge_dd_tags_to_metadata"])
def test_finetune_shims_run_the_tools(imgs, tmp_path, name):
    out = tmp_path / "shim.json"
    done = subprocess.run([sys.executable, os.path.join(REPO, "finetune", f"{name}.py"), str(imgs), str(out)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert read(out) == ({"a": {"caption": "a red square"}, "b": {"caption": "a tall one"}}
                         if "captions" in name else {"a": {"tags": "square, red"}, "c": {"tags": "wide"}})
    bad = subprocess.run([sys.executable, os.path.join(REPO, "finetune", "prepare_buckets_latents.py"), str(imgs),
                          "absent.json", "o.json", "m"], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: in_json absent.json")


@pytest.mark.parametrize("fixture, suffix", [("tiny_sd2_dir", "_sd.npz"), ("tiny_sdxl_dir", "_sdxl.npz")])
def test_other_families_write_their_cache_files(request, fixture, suffix, imgs, captioned, tmp_path):
    model = request.getfixturevalue(fixture)
    out = tmp_path / "lat.json"
    assert prepare_tool.main([str(imgs), str(captioned), str(out), model, *BUCKET_FLAGS, "--device", "cpu"]) == 0
    assert sorted(os.path.basename(p) for p in files_under(imgs) if p.endswith(".npz")) == [
        f"a_0100x0100{suffix}", f"b_0060x0150{suffix}", f"c_0200x0070{suffix}"]
    cfg = parse_args(["--in_json", str(out), "--train_data_dir", str(imgs), "--cache_latents_to_disk"])
    dataset = build_dataset(cfg)
    family = load_vae_family(SimpleNamespace(model_name_or_path=model, vae=None, mixed_precision="no",
                                             no_half_vae=False, device="cpu"))
    calls = []
    dataset.cache_latents(lambda pixels: calls.append(pixels) or family.encode_images(pixels), 1,
                          caching.make_latent_cache(cfg, family.vae, family.name))
    assert calls == [] and dataset.latent_cache.counts["valid"] == 3
