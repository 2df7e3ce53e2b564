"""--dataset_config: kohya's [general] / [[datasets]] / [[datasets.subsets]] schema, fallbacks, errors, groups."""

from __future__ import annotations

import json
import logging

import pytest
from safetensors import safe_open

import train_network
from library.config import parse_args
from library.dataset import build_dataset
from library.errors import UserError
from tests.conftest import files_under, train_argv
from tests.test_dataset import write_image, write_text

GENERAL = """
[general]
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 16
"""


@pytest.fixture
def folders(tmp_path):
    """cats: four 64x64 captioned 'cat, sitting'; dogs: two 64x96 without captions; people: three 64x64 (reg)."""
    for i in range(4):
        write_image(str(tmp_path / "cats" / f"c{i}.png"), (64, 64), value=i)
        write_text(str(tmp_path / "cats" / f"c{i}.caption"), "cat, sitting")
    for i in range(2):
        write_image(str(tmp_path / "dogs" / f"d{i}.png"), (64, 96), value=50 + i)
    for i in range(3):
        write_image(str(tmp_path / "people" / f"p{i}.png"), (64, 64), value=100 + i)
    return tmp_path


def two_datasets(root) -> str:
    """datasets[0]: cats x3 + people (reg), batch 2, buckets; datasets[1]: dogs x2, batch 1, fixed 64x64."""
    return GENERAL + f"""
[[datasets]]
resolution = 64
batch_size = 2
  [[datasets.subsets]]
  image_dir = "{root / 'cats'}"
  num_repeats = 3
  caption_prefix = "photo of"
  [[datasets.subsets]]
  image_dir = "{root / 'people'}"
  is_reg = true
  class_tokens = "person"

[[datasets]]
resolution = [64, 64]
batch_size = 1
enable_bucket = false
  [[datasets.subsets]]
  image_dir = "{root / 'dogs'}"
  class_tokens = "dog"
  num_repeats = 2
"""


def cfg_for(tmp_path, text: str, *extra: str):
    path = tmp_path / "ds.toml"
    path.write_text(text, encoding="utf-8")
    return parse_args(["--dataset_config", str(path), "--seed", "3", *extra])


def test_two_datasets_counts_batches_and_reg_balance(folders):
    group = build_dataset(cfg_for(folders, two_datasets(folders)))
    first, second = group.datasets
    assert (first.batch_size, second.batch_size) == (2, 1)
    # 4 cats x 3 = 12 train samples; 3 reg images balanced to 12: 4 repeats each
    assert sorted(r.num_repeats for r in first.records if r.is_reg) == [4, 4, 4]
    assert (len(first), len(second), len(group)) == (12, 4, 16)  # 24 / 2 and 2 x 2 / 1
    assert second.settings.enable_bucket is False and second.settings.resolution == (64, 64)
    assert {r.bucket for r in second.records} == {(64, 64)}  # 64x96 covered and cropped without buckets
    info = group.info
    assert (info["num_train_images"], info["num_reg_images"]) == (16, 3)
    assert info["dataset_dirs"] == {"cats": {"n_repeats": 3, "img_count": 4}, "dogs": {"n_repeats": 2, "img_count": 2}}
    assert [d["batch_size_per_device"] for d in info["datasets"]] == [2, 1]
    assert [d["num_train_images"] for d in info["datasets"]] == [12, 4]
    assert info["datasets"][0]["subsets"][1] == {
        "img_count": 3, "num_repeats": 1, "color_aug": False, "flip_aug": False, "random_crop": False,
        "shuffle_caption": False, "keep_tokens": 0, "keep_tokens_separator": "", "secondary_separator": None,
        "enable_wildcard": False, "caption_prefix": None, "caption_suffix": None, "image_dir": "people",
        "class_tokens": "person", "is_reg": True}
    assert info["datasets"][1]["resolution"] == (64, 64) and info["datasets"][1]["enable_bucket"] is False


def test_every_batch_once_per_epoch_with_per_subset_captions(folders):
    group = build_dataset(cfg_for(folders, two_datasets(folders)))
    group.set_epoch(1)
    batches = [group[i] for i in range(len(group))]
    sizes = sorted(len(b["captions"]) for b in batches)
    assert sizes == [1] * 4 + [2] * 12
    captions = [c for b in batches for c in b["captions"]]
    assert captions.count("photo of cat, sitting") == 12 and captions.count("person") == 12
    assert captions.count("dog") == 4
    # the order interleaves datasets, is the same in a fresh copy (a worker), and changes per epoch
    other = build_dataset(cfg_for(folders, two_datasets(folders)))
    assert [other[(1, i)]["image_paths"] for i in range(len(other))] == [b["image_paths"] for b in batches]
    assert group._plan(1) != group._plan(2)
    assert sorted(group._plan(2)) == sorted(group._plan(1))


def test_fallback_subset_dataset_general_cli(folders):
    text = f"""
[general]
caption_prefix = "general"
keep_tokens = 1
[[datasets]]
caption_prefix = "dataset"
  [[datasets.subsets]]
  image_dir = "{folders / 'cats'}"
  caption_prefix = "subset"
  [[datasets.subsets]]
  image_dir = "{folders / 'dogs'}"
[[datasets]]
  [[datasets.subsets]]
  image_dir = "{folders / 'people'}"
"""
    cfg = cfg_for(folders, text, "--resolution", "64,96", "--train_batch_size", "3", "--caption_suffix", "cli",
                  "--keep_tokens", "5")
    group = build_dataset(cfg)
    opts = {r.path.rsplit("/", 2)[1]: r.caption_options for r in group.records}
    assert [opts[n].prefix for n in ("cats", "dogs", "people")] == ["subset", "dataset", "general"]
    assert {opts[n].suffix for n in opts} == {"cli"} and {opts[n].keep_tokens for n in opts} == {1}
    assert [d.batch_size for d in group.datasets] == [3, 3]
    assert group.datasets[1].settings.resolution == (64, 96)
    assert {s.num_repeats for s in group.subsets} == {1}


def test_train_data_dir_is_ignored_with_a_warning(folders, caplog):
    with caplog.at_level(logging.WARNING):
        group = build_dataset(cfg_for(folders, two_datasets(folders), "--train_data_dir", str(folders / "nowhere")))
    assert "--train_data_dir is ignored" in caplog.text and len(group) == 16


def test_same_folder_twice_is_numbered_in_dataset_dirs(folders):
    text = f"""
[general]
resolution = 64
[[datasets]]
  [[datasets.subsets]]
  image_dir = "{folders / 'cats'}"
[[datasets]]
  [[datasets.subsets]]
  image_dir = "{folders / 'cats'}"
  num_repeats = 4
"""
    info = build_dataset(cfg_for(folders, text)).info
    assert info["dataset_dirs"] == {"cats": {"n_repeats": 1, "img_count": 4}, "cats (2)": {"n_repeats": 4, "img_count": 4}}
    assert info["tag_frequency"] == {"cats": {"cat": 4, "sitting": 4}}


SUBSET = '[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = "{cats}"\n'
ERRORS = [
    (SUBSET + "  num_repeat = 2\n", "datasets[0].subsets[0]: unknown key 'num_repeat': did you mean num_repeats?"),
    ("[general]\nimage_dir = 'x'\n" + SUBSET, "[general]: image_dir belongs in [[datasets.subsets]], not in [general]"),
    (SUBSET + "  batch_size = 2\n",
     "datasets[0].subsets[0]: batch_size belongs in [general] or [[datasets]], not in [[datasets.subsets]]"),
    (SUBSET + "  num_repeats = '2'\n", "datasets[0].subsets[0]: num_repeats = '2': expected an integer"),
    (SUBSET + "  is_reg = 1\n", "is_reg = 1: expected true or false"),
    (SUBSET.replace("resolution = 64", "resolution = [64, 64, 64]"), "resolution = [64, 64, 64]: expected a size"),
    ("[[datasets]]\n  [[datasets.subsets]]\n  num_repeats = 2\n", "datasets[0].subsets[0]: image_dir is required"),
    (SUBSET.replace("{cats}", "/no/such/dir"), "image_dir '/no/such/dir': folder not found"),
    ("[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  metadata_file = 'm.json'\n",
     "datasets[0].subsets[0]: metadata file m.json: file not found"),
    ("[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  metadata_file = 'm.json'\n  is_reg = true\n",
     "datasets[0].subsets[0]: is_reg does not apply to a metadata_file subset"),
    (SUBSET + "  [[datasets.subsets]]\n  metadata_file = 'm.json'\n",
     "datasets[0]: metadata_file subsets and image-folder subsets cannot share a dataset"),
    (SUBSET + "  conditioning_data_dir = '{cats}'\n",
     "datasets[0].subsets[0]: conditioning_data_dir holds loss masks: add --masked_loss"),
    (SUBSET + "  flip_aug = 1\n", "datasets[0].subsets[0]: flip_aug = 1: expected true or false"),
    (SUBSET + "  face_crop_aug_range = [4.0, 2.0]\n", "datasets[0].subsets[0]: --face_crop_aug_range (4.0, 2.0)"),
    (SUBSET + "  network_multiplier = 0.5\n",
     "network_multiplier belongs in [general] or [[datasets]], not in [[datasets.subsets]]"),
    ("[general]\nresolution = 64\n", "no [[datasets]] table"),
    ("[[datasets]]\nresolution = 64\n", "datasets[0]: no [[datasets.subsets]]"),
    ("[[dataset]]\nresolution = 64\n", "unknown top-level key 'dataset': did you mean datasets?"),
    (SUBSET + "  is_reg = true\n", "datasets[0]: no training images"),
    (SUBSET + "[general]\nenable_bucket = true\nmin_bucket_reso = 128\n", "datasets[0]: --min_bucket_reso 128"),
    (SUBSET + "[general]\nbatch_size = 0\n", "datasets[0]: batch_size 0 must be at least 1"),
    ("[[datasets]\n", "not valid TOML"),
]


@pytest.mark.parametrize("text,expected", ERRORS)
def test_errors_name_file_table_and_key(folders, text, expected):
    with pytest.raises(UserError) as err:
        build_dataset(cfg_for(folders, text.replace("{cats}", str(folders / "cats"))))
    assert expected in str(err.value)
    assert str(err.value).startswith(str(folders / "ds.toml")) and "\n" not in str(err.value)


def test_augmentation_keys_apply_per_subset(folders):
    # cats: flip from the subset; dogs: random_crop from the dataset, flip from the command line;
    # people (second dataset): nothing of the first dataset's
    text = f"""
[general]
resolution = 64
[[datasets]]
random_crop = true
  [[datasets.subsets]]
  image_dir = "{folders / 'cats'}"
  flip_aug = false
  random_crop = false
  [[datasets.subsets]]
  image_dir = "{folders / 'dogs'}"
[[datasets]]
  [[datasets.subsets]]
  image_dir = "{folders / 'people'}"
  color_aug = true
"""
    group = build_dataset(cfg_for(folders, text, "--flip_aug"))
    augment = {r.path.rsplit("/", 2)[1]: r.augment for r in group.records}
    assert [(augment[n].flip, augment[n].random_crop, augment[n].color) for n in ("cats", "dogs", "people")] == [
        (False, False, False), (True, True, False), (True, False, True)]
    subsets = [s for d in group.info["datasets"] for s in d["subsets"]]
    assert [(s["flip_aug"], s["random_crop"], s["color_aug"]) for s in subsets] == [
        (False, False, False), (True, True, False), (True, False, True)]
    flips = {}
    for epoch in range(8):
        group.set_epoch(epoch)
        for i in range(len(group)):
            batch = group[i]
            for path, flipped in zip(batch["image_paths"], batch["flipped"].tolist()):
                flips.setdefault(path.rsplit("/", 2)[1], set()).add(flipped)
    assert flips["cats"] == {False} and flips["dogs"] == {False, True} and flips["people"] == {False, True}
    # kohya's rule per subset: a subset that changes its pixels every epoch cannot have its latents cached
    with pytest.raises(UserError, match=r"datasets\[0\]\.subsets\[1\]: random_crop changes the pixels every epoch"):
        build_dataset(cfg_for(folders, text, "--cache_latents"))


def test_missing_file_and_wrong_extension(tmp_path):
    for name, expected in (("d.toml", "d.toml: file not found"), ("d.yaml", "expected a .toml or .json file")):
        cfg = parse_args(["--dataset_config", str(tmp_path / name)])
        with pytest.raises(UserError, match=expected):
            build_dataset(cfg)


def test_json_config_is_read_like_toml(folders):
    path = folders / "ds.json"
    path.write_text(json.dumps({"datasets": [{"resolution": [64, 64], "subsets": [
        {"image_dir": str(folders / "cats"), "num_repeats": 2}]}]}), encoding="utf-8")
    group = build_dataset(parse_args(["--dataset_config", str(path)]))
    assert group.info["num_train_images"] == 8 and len(group) == 8


def test_train_network_with_dataset_config(tiny_model_dir, folders, tmp_path):
    ds = folders / "ds.toml"
    ds.write_text(two_datasets(folders), encoding="utf-8")
    out = tmp_path / "out"
    argv = [a for a in train_argv(tiny_model_dir, "unused", str(out), "--dataset_config", str(ds),
                                  "--cache_latents", "--max_train_epochs", "1")]
    i = argv.index("--train_data_dir")
    del argv[i:i + 2]
    argv[argv.index("--max_train_steps") + 1] = "100"
    assert train_network.main(argv) == 0
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_num_train_images"], meta["ss_num_reg_images"]) == ("16", "3")
    assert (meta["ss_num_batches_per_epoch"], meta["ss_steps"]) == ("16", "16")
    datasets = json.loads(meta["ss_datasets"])
    assert [(d["batch_size_per_device"], len(d["subsets"])) for d in datasets] == [(2, 2), (1, 1)]
    assert json.loads(meta["ss_dataset_dirs"]) == {"cats": {"n_repeats": 3, "img_count": 4},
                                                   "dogs": {"n_repeats": 2, "img_count": 2}}
    assert "ss_batch_size_per_device" not in meta and "ss_reg_dataset_dirs" not in meta
    report = json.loads((out / "dataset_report.json").read_text())
    assert (report["batches_per_epoch"], report["steps_per_epoch"], report["total_steps"]) == (16, 16, 16)
    assert [(s["folder"].rsplit("/", 1)[-1], s["samples"]) for s in report["subsets"]] == [
        ("cats", 12), ("people", 12), ("dogs", 4)]
    assert sorted(files_under(out)) == sorted(str(out / n) for n in
                                              ("dataset_report.json", "dataset_report.txt", "lora.safetensors"))


def test_network_multiplier_per_dataset_reaches_every_batch(folders):
    cats, dogs = folders / "cats", folders / "dogs"
    text = (f'[general]\nresolution = 64\nnetwork_multiplier = 0.5\n'
            f'[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "{cats}"\n'
            f'[[datasets]]\nnetwork_multiplier = -1.0\n  [[datasets.subsets]]\n  image_dir = "{dogs}"\n')
    group = build_dataset(cfg_for(folders, text))
    assert [d.network_multiplier for d in group.datasets] == [0.5, -1.0]
    for i in range(len(group)):
        batch = group[(0, i)]
        owner = group.datasets[group._order[i][0]]
        assert batch["network_multiplier"] == owner.network_multiplier


def test_flipped_latents_are_cached_for_flip_subsets_only(folders):
    text = (f'[general]\nresolution = 64\n[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "{folders / "cats"}"\n'
            f'  flip_aug = true\n  [[datasets.subsets]]\n  image_dir = "{folders / "people"}"\n')
    group = build_dataset(cfg_for(folders, text))
    calls = []

    def encode(pixels):
        calls.append(pixels.shape[0])
        return pixels[:, :, ::8, ::8].repeat(1, 2, 1, 1)[:, :4]

    group.cache_latents(encode, batch_size=8)
    assert sorted(calls) == [3, 4, 4]  # people once; cats, then their mirror images: batches never mix the two
    cache = group.latent_cache
    flipped = {r.path.rsplit("/", 2)[1]: cache.get(r.path, flipped=True) is not None for r in group.records}
    assert flipped == {"cats": True, "people": False}


def test_token_warmup_and_cache_info_per_subset(folders, caplog):
    for i in range(4):
        write_text(str(folders / "cats" / f"c{i}.caption"), "a, b, c, d, e")
    text = (f'[general]\nresolution = 64\ncache_info = true\n[[datasets]]\n'
            f'  [[datasets.subsets]]\n  image_dir = "{folders / "cats"}"\n'
            f'  token_warmup_min = 2\n  token_warmup_step = 0.5\n')
    with caplog.at_level(logging.INFO):
        group = build_dataset(cfg_for(folders, text, "--max_train_steps", "8"))
    assert "cache_info: sdtune reads image sizes and captions afresh" in caplog.text
    assert not any(p.name == "metadata_cache.json" for p in folders.rglob("*"))
    # warmup ends at step floor(0.5 * 8) = 4: 2 tags at step 0, 2 + floor(2 * 3 / 4) = 3 at step 2
    assert group.clock.max_train_steps == 8
    assert group[(0, 0)]["captions"] == ["a, b"] and group[(0, 2)]["captions"] == ["a, b, c"]
    assert group[(1, 0)]["captions"] == ["a, b, c, d, e"]


def test_dataset_repeats_is_the_fallback_of_num_repeats(folders):
    text = (f'[general]\nresolution = 64\n[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "{folders / "cats"}"\n'
            f'  [[datasets.subsets]]\n  image_dir = "{folders / "dogs"}"\n  num_repeats = 2\n')
    group = build_dataset(cfg_for(folders, text, "--dataset_repeats", "3"))
    assert [s.num_repeats for s in group.subsets] == [3, 2] and group.info["num_train_images"] == 16
