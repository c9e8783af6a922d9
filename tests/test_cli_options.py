"""Every command-line option, exercised through the command line with an effect that could fail.

One small tiny-preset run (2 pairs, 2 steps) is generated once and shared: the other runs here
differ from it by the options under test, so each difference is that option's doing.
"""

import ast
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from magicseg_engine.cli import app
from magicseg_engine.data.shards import finished_keys, iter_samples

TESTS = Path(__file__).parent
SOURCE_FLAGS = ["--classes", "voc", "--num-pairs", 2, "--batch-size", 2, "--steps", 2, "--device", "cpu"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def samples(run: Path) -> dict[str, dict]:
    """key -> {"meta", "pos", "neg", "mask"} of every finished pair."""
    out = {}
    for s in iter_samples(run):
        out[s["__key__"]] = {"meta": json.loads(s["json"]), "pos": s["pos.jpg"], "neg": s["neg.jpg"],
                             "mask": np.asarray(Image.open(io.BytesIO(s["mask.png"]))) if "mask.png" in s else None}
    return out


def pixels(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)), dtype=int)


def run_json(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


# --- the inventory: every option of every command needs a test that runs that command with it ------

# (command, option) pairs no test here can run, each with the reason; an entry must name a pair
# that exists, or the test below fails. TensorRT, GPU kernels and clusters are option values, not
# options, so only pairs whose only cheap preset cannot reach them are listed.
UNTESTABLE_HERE: dict[tuple[str, str], str] = {
    # (command, option): why no test here can run it. Empty: every pair runs on a CPU.
}


def _options(command, path=()):
    """(command path, option strings) for every command of the click tree typer builds."""
    if hasattr(command, "commands"):
        for name, sub in sorted(command.commands.items()):
            yield from _options(sub, (*path, name))
        return
    for param in command.params:
        if getattr(param, "param_type_name", "") == "option":
            yield path, [*param.opts, *param.secondary_opts]


def _scopes(source: str):
    """The string constants each function of a test module can pass to the command line, in order.

    The unit is one module-level function (a test, a fixture or a helper; methods of test classes
    count alone), with the module-level constants and functions it names, followed transitively:
    tests pass flags through lists such as SOURCE_FLAGS and helpers that build argument lists.
    A whole module would be too coarse (test_bench.py runs a dozen commands, and an option of one
    would vouch for all); a single call too fine (flags reach `invoke` through local lists).
    """
    tree = ast.parse(source)
    top: dict[str, ast.AST] = {}
    for stmt in tree.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            top[stmt.name] = stmt
        elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
            for target in stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]:
                top.update({n.id: stmt for n in ast.walk(target) if isinstance(n, ast.Name)})
    functions = [s for s in tree.body if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for cls in (s for s in tree.body if isinstance(s, ast.ClassDef)):
        functions += [s for s in cls.body if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for function in functions:
        if function.name == test_every_option_is_named_by_some_test.__name__:
            continue  # the allow-list must not vouch for itself
        seen, todo, strings = {function.name}, [function], []
        while todo:
            node = todo.pop(0)
            # Source order, so that "bench", "fast" in one argument list read as one command path;
            # the decorators count (parametrize lists flags).
            constants = sorted((n for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)),
                               key=lambda n: (n.lineno, n.col_offset))
            strings += [n.value for n in constants]
            for name in (n.id for n in ast.walk(node) if isinstance(n, ast.Name)):
                if name in top and name not in seen:
                    seen.add(name)
                    todo.append(top[name])
        yield strings


def _runs(strings: list[str], path: tuple[str, ...], groups: set[str]) -> bool:
    """Whether `path`'s words stand together in `strings`: "bench", "generate" for bench generate;
    "generate" not after a group's name for the top-level generate."""
    k = len(path)
    return any(tuple(strings[i:i + k]) == path and not (k == 1 and i and strings[i - 1] in groups)
               for i in range(len(strings) - k + 1))


def test_every_option_is_named_by_some_test():
    """Each (command, option) pair needs a test function that names the command's words and the
    option: an option tested on one command no longer vouches for another command's option of the
    same name. A stale allow-list entry fails too."""
    root = typer.main.get_command(app)
    groups = {name for name, command in root.commands.items() if hasattr(command, "commands")}
    pairs = {(" ".join(path), o): path for path, opts in _options(root) for o in opts}
    assert len(pairs) > 300  # the walk saw the whole tree, bench's subcommands included
    scopes = [s for p in sorted(TESTS.glob("*.py")) for s in _scopes(p.read_text(encoding="utf-8"))]
    missing = sorted(f"{command} {option}" for (command, option), path in pairs.items()
                     if (command, option) not in UNTESTABLE_HERE
                     and not any(_runs(s, path, groups) and any(v == option or v.startswith(option + "=") for v in s)
                                 for s in scopes))
    assert not missing, f"(command, option) pairs no test runs: {missing}"
    assert not set(UNTESTABLE_HERE) - set(pairs), "allow-listed pairs that no command has"


# --- shared runs -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("options")


@pytest.fixture(scope="module")
def source(work):
    """The baseline run: tiny preset, --seed 0, --weights-seed 0, attention masks refined by SAM."""
    out = work / "source"
    ok("generate", *SOURCE_FLAGS, "--out", out)
    return out


@pytest.fixture(scope="module")
def sam7(work):
    """A segment-anything checkpoint file holding the tiny SAM that weights seed 7 draws."""
    from magicseg_engine.masks.sam import build_sam

    path = work / "sam-tiny-seed7.pth"
    torch.save(build_sam("tiny", seed=7).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def detector5(work):
    """A Grounding DINO folder (transformers' layout) holding the tiny detector of weights seed 5."""
    from magicseg_engine.masks.detector import build_detector

    folder = work / "grounding-dino-seed5"
    detector = build_detector("tiny", seed=5)
    detector.model.save_pretrained(folder)
    detector.processor.save_pretrained(folder)
    return folder


# --- generate ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sampling_options_change_the_images_and_are_recorded(source, detector5, tmp_path):
    out = tmp_path / "run"
    ok("generate", *SOURCE_FLAGS, "--out", out, "--guidance", 1.5, "--scheduler", "euler", "--independent-noise",
       "--mask-source", "detector", "--detector-model", detector5, "--box-threshold", 0, "--text-threshold", 1.0,
       "--no-sam")
    base, got = samples(source), samples(out)
    assert set(got) == set(base)  # same weights, prompts and seeds: the same pairs
    for key, s in got.items():
        assert s["meta"]["guidance"] == 1.5 and s["meta"]["scheduler"] == "euler"
        assert s["meta"]["shared_noise"] is False and s["meta"]["mask_source"] == "detector"
        assert np.abs(pixels(s["pos"]) - pixels(base[key]["pos"])).mean() > 1.0
        # Every box is kept (box threshold 0) but no prompt token scores above 1: no phrase names a class.
        assert not s["mask"].any()
    mentions = sum(len(s["meta"]["classes"]) for s in got.values())
    saved = run_json(out)
    assert saved["sessions"][-1]["classes_not_found"] == mentions
    assert saved["config"]["masks"]["detector_model"] == str(detector5)
    assert saved["config"]["masks"]["text_threshold"] == 1.0


@pytest.mark.slow
def test_sam_checkpoint_layout_and_encode_workers(source, sam7, tmp_path):
    """Options that leave the images alone: --sam-checkpoint changes only the masks; NHWC
    weights and one encoding thread change nothing but float rounding, and are recorded."""
    out = tmp_path / "run"
    ok("generate", *SOURCE_FLAGS, "--out", out, "--sam-checkpoint", sam7, "--channels-last", "--encode-workers", 1)
    base, got = samples(source), samples(out)
    assert set(got) == set(base)
    for key, s in got.items():
        assert np.abs(pixels(s["pos"]) - pixels(base[key]["pos"])).mean() < 1.0
    assert any((s["mask"] != base[k]["mask"]).any() for k, s in got.items())  # another SAM's masks
    saved = run_json(out)
    assert saved["config"]["sam"]["checkpoint"] == str(sam7)
    assert saved["sessions"][-1]["channels_last"] is True and saved["sessions"][-1]["encode_workers"] == 1
    assert run_json(source)["sessions"][-1]["encode_workers"] == 4  # the default


@pytest.mark.parametrize("args, message", [
    (["--encode-workers", 0], "--encode-workers must be a positive number, got 0"),
    (["--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
])
def test_generate_refuses_in_one_line(tmp_path, args, message):
    out = tmp_path / "run"
    result = invoke("generate", *SOURCE_FLAGS, "--out", out, *args)
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_resume_with_other_prompts_is_refused_and_leaves_the_run(source):
    before = sorted(finished_keys(source))
    result = invoke("generate", *SOURCE_FLAGS[:3], 3, *SOURCE_FLAGS[4:], "--out", source, "--resume")
    assert result.exit_code == 2 and "--resume: the prompts differ from the run in" in result.stderr
    # The same settings, another vocabulary: the same count of other prompts.
    result = invoke("generate", "--classes", "context", *SOURCE_FLAGS[2:], "--out", source, "--resume")
    assert result.exit_code == 2 and "--resume: the prompts differ" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(finished_keys(source)) == before


# --- seeds: --seed samples, --weights-seed draws the weights -------------------------------------------

@pytest.mark.slow
def test_seed_changes_the_samples_and_weights_seed_the_model(source, tmp_path):
    base = samples(source)
    model = {s["meta"]["model"] for s in base.values()}
    assert len(model) == 1 and next(iter(model)).startswith("tiny-random:seed=0:")
    # Another --seed: other prompts and noise from the same weights (--no-channels-last: NCHW, recorded).
    other_seed = tmp_path / "seed1"
    ok("generate", *SOURCE_FLAGS, "--out", other_seed, "--seed", 1, "--no-channels-last")
    got = samples(other_seed)
    assert {s["meta"]["model"] for s in got.values()} == model
    assert {s["meta"]["seed"] for s in got.values()}.isdisjoint({s["meta"]["seed"] for s in base.values()})
    assert run_json(other_seed)["sessions"][-1]["channels_last"] is False
    # Another --weights-seed: the same prompts and seeds drawn by other weights.
    other_weights = tmp_path / "weights1"
    ok("generate", *SOURCE_FLAGS, "--out", other_weights, "--weights-seed", 1)
    got = samples(other_weights)
    by_prompt = {s["meta"]["prompt_id"]: s for s in base.values()}
    assert {s["meta"]["prompt_id"] for s in got.values()} == set(by_prompt)
    for s in got.values():
        assert s["meta"]["model"].startswith("tiny-random:seed=1:")
        assert np.abs(pixels(s["pos"]) - pixels(by_prompt[s["meta"]["prompt_id"]]["pos"])).mean() > 1.0
    config = run_json(other_weights)["config"]
    assert (config["seed"], config["weights_seed"]) == (0, 1)


def test_a_run_from_before_weights_seed_resumes_with_the_weights_of_its_seed(source, tmp_path):
    """run.json without weights_seed: its weights came from --seed, and they still do."""
    old = tmp_path / "old"
    shutil.copytree(source, old)
    saved = run_json(old)
    del saved["config"]["weights_seed"]
    (old / "run.json").write_text(json.dumps(saved))
    result = ok("generate", *SOURCE_FLAGS, "--out", old, "--resume")  # seed 0: weights seed 0, as before
    assert "0 pairs generated, 2 were already done" in result.stderr
    # An old run of --seed 3 drew its weights from 3: resuming it with other weights is refused, saying which.
    saved["config"]["seed"] = saved["config"]["prompts"]["seed"] = 3
    (old / "run.json").write_text(json.dumps(saved))
    result = invoke("generate", *SOURCE_FLAGS, "--seed", 3, "--out", old, "--resume")
    assert result.exit_code == 2 and "(weights_seed); its weights come from --weights-seed 3" in result.stderr


@pytest.mark.slow
def test_build_engines_weights_seed_and_its_older_name(tmp_path):
    manifests = {}
    for name, flags in (("default", []), ("seed1", ["--seed", 1]), ("weights1", ["--weights-seed", 1])):
        ok("build-engines", "--out", tmp_path / name, "--components", "text-encoder", "--device", "cpu", *flags)
        manifests[name] = json.loads((tmp_path / name / "manifest.json").read_text())
    digest = {n: m["components"][0]["sha256"] for n, m in manifests.items()}
    assert manifests["default"]["weights_seed"] == 0 and manifests["default"]["model_id"].startswith("tiny-random:seed=0:")
    assert manifests["weights1"]["weights_seed"] == 1 and manifests["weights1"]["model_id"].startswith("tiny-random:seed=1:")
    assert digest["seed1"] == digest["weights1"] != digest["default"]  # --seed is --weights-seed's older name


def test_bench_generate_weights_seed(tmp_path):
    out = tmp_path / "bench.json"
    ok("bench", "generate", "--pairs", 1, "--batch-size", 1, "--steps", 1, "--reps", 1, "--warmup", 0,
       "--device", "cpu", "--weights-seed", 2, "--json", out)
    assert json.loads(out.read_text())["settings"]["model"].startswith("tiny-random:seed=2:")


# --- masks -----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_masks_sam_checkpoint_equals_the_random_sam_of_its_weights_seed(source, sam7, tmp_path):
    ok("masks", "--data", source, "--out", tmp_path / "file", "--sam-checkpoint", sam7, "--device", "cpu")
    ok("masks", "--data", source, "--out", tmp_path / "seed7", "--weights-seed", 7, "--device", "cpu")
    from_file, from_seed, base = samples(tmp_path / "file"), samples(tmp_path / "seed7"), samples(source)
    assert set(from_file) == set(from_seed) == set(base)
    for key in base:
        assert np.array_equal(from_file[key]["mask"], from_seed[key]["mask"])
        assert from_file[key]["pos"] == base[key]["pos"]  # images are copied, never re-encoded
    assert any((from_seed[k]["mask"] != base[k]["mask"]).any() for k in base)
    assert run_json(tmp_path / "file")["config"]["sam"]["checkpoint"] == str(sam7)
    assert run_json(tmp_path / "file")["config"]["weights_seed"] == 0  # the source run's
    assert run_json(tmp_path / "seed7")["config"]["weights_seed"] == 7


@pytest.mark.slow
def test_masks_detector_folder_and_text_threshold(source, detector5, tmp_path):
    common = ["--data", source, "--mask-source", "detector", "--no-sam", "--box-threshold", 0, "--device", "cpu"]
    ok("masks", *common, "--out", tmp_path / "folder", "--detector-model", detector5, "--text-threshold", 0)
    ok("masks", *common, "--out", tmp_path / "tiny5", "--weights-seed", 5, "--text-threshold", 0)
    ok("masks", *common, "--out", tmp_path / "strict", "--detector-model", detector5, "--text-threshold", 1.0)
    folder, tiny5, strict = (samples(tmp_path / n) for n in ("folder", "tiny5", "strict"))
    # The folder holds the tiny detector of weights seed 5: the same boxes, so the same masks.
    assert all(np.array_equal(folder[k]["mask"], tiny5[k]["mask"]) for k in folder)
    assert any(s["mask"].any() for s in folder.values())
    assert not any(s["mask"].any() for s in strict.values())
    mentions = sum(len(s["meta"]["classes"]) for s in strict.values())
    assert run_json(tmp_path / "strict")["sessions"][-1]["classes_not_found"] == mentions
    assert run_json(tmp_path / "folder")["sessions"][-1]["classes_not_found"] == 0


@pytest.mark.slow
def test_masks_resumes_a_partial_run_and_overwrite_replaces_it(source, tmp_path, monkeypatch):
    from magicseg_engine.masks.annotate import MaskAnnotator

    out = tmp_path / "masks"
    calls = {"n": 0}
    real = MaskAnnotator.__call__

    def fail_second_batch(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("stopped after the first batch")
        return real(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(MaskAnnotator, "__call__", fail_second_batch)
        result = invoke("masks", "--data", source, "--out", out, "--batch-size", 1, "--device", "cpu")
    assert result.exit_code != 0 and "stopped after the first batch" in str(result.exception)
    assert len(finished_keys(out)) == 1  # the first pair's shard was closed and kept
    result = invoke("masks", "--data", source, "--out", out, "--batch-size", 1, "--device", "cpu")
    assert result.exit_code == 2 and "already holds a run" in result.stderr
    result = invoke("masks", "--data", source, "--out", out, "--device", "cpu", "--resume", "--overwrite")
    assert result.exit_code == 2 and "--resume and --overwrite exclude each other" in result.stderr
    result = ok("masks", "--data", source, "--out", out, "--batch-size", 1, "--device", "cpu", "--resume")
    assert "1 pairs annotated, 1 were already done" in result.stderr
    assert sorted(finished_keys(out)) == sorted(finished_keys(source))
    assert sum(1 for _ in iter_samples(out)) == 2  # each pair once
    # --overwrite starts again from nothing with the new flags.
    result = ok("masks", "--data", source, "--out", out, "--no-sam", "--device", "cpu", "--overwrite")
    assert "2 pairs annotated, 0 were already done" in result.stderr
    assert {s["meta"]["mask_source"] for s in samples(out).values()} == {"attention"}
    assert run_json(out)["config"]["masks"]["refine_with_sam"] is False


# --- generate on Ray ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cpus_per_worker_sets_each_ray_workers_threads(tmp_path):
    import logging

    ray = pytest.importorskip("ray", reason="needs Ray: pip install 'magicseg-engine[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        out = tmp_path / "run"
        ok("generate", "--ray", "--workers", 1, "--cpus-per-worker", 2, "--num-gpus-per-worker", 0,
           *SOURCE_FLAGS[:-2], "--out", out, "--mask-source", "none")
        session = run_json(out)["sessions"][-1]
        assert session["cpus_per_worker"] == 2 and session["generated"] == 2
        result = invoke("generate", "--ray", "--workers", 1, "--cpus-per-worker", 3, "--num-gpus-per-worker", 0,
                        *SOURCE_FLAGS[:-2], "--out", tmp_path / "too-big", "--mask-source", "none")
        assert result.exit_code == 2 and not (tmp_path / "too-big").exists()
    finally:
        ray.shutdown()


# --- pretrain and evaluate ------------------------------------------------------------------------------------

PRETRAIN = ["--steps", 2, "--batch-size", 4, "--checkpoint-every", 2, "--workers", 0, "--device", "cpu"]


@pytest.fixture(scope="module")
def pretrain_data(work):
    from magicseg_engine.train.synthetic import write_synthetic_run

    write_synthetic_run(work / "synthetic", 8, size=64, seed=3)
    return work / "synthetic"


@pytest.fixture(scope="module")
def pretrained(work, pretrain_data):
    """Two steps with the preset's settings: the baseline, and the checkpoint evaluate scores."""
    ok("pretrain", "--data", pretrain_data, "--out", work / "pretrain", *PRETRAIN)
    return work / "pretrain"


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_pretrain_precision_bf16_changes_the_arithmetic(pretrained, pretrain_data, tmp_path):
    ok("pretrain", "--data", pretrain_data, "--out", tmp_path / "bf16", *PRETRAIN, "--precision", "bf16")
    assert json.loads((tmp_path / "bf16" / "pretrain.json").read_text())["config"]["precision"] == "bf16"
    # Same weights, data and seed: the first loss differs only by bfloat16 rounding.
    first, base = metrics(tmp_path / "bf16")[0]["loss"], metrics(pretrained)[0]["loss"]
    assert first != base and first == pytest.approx(base, rel=0.05)


@pytest.mark.slow
def test_pretrain_lr_warmup_clip_weights_and_dali_loader(pretrained, pretrain_data, tmp_path):
    from safetensors.torch import save_file

    from magicseg_engine.train.loop import warmup_cosine
    from magicseg_engine.train.model import MagicSegModel, SegModelConfig

    # CLIP towers whose patch embedding is all zeros: after two small steps it must still be near zero.
    state = MagicSegModel(SegModelConfig.preset("tiny", freeze_backbone=False)).clip.state_dict()
    state["visual.conv1.weight"] = torch.zeros_like(state["visual.conv1.weight"])
    clip = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(clip))
    out = tmp_path / "run"
    ok("pretrain", "--data", pretrain_data, "--out", out, *PRETRAIN, "--lr", 1e-3, "--warmup-steps", 4,
       "--clip-weights", clip, "--loader", "dali")
    base_lr = [m["lr"] for m in metrics(pretrained)]
    lr = [m["lr"] for m in metrics(out)]
    schedule = warmup_cosine(4, 2, 0.0)
    assert lr[1] / lr[0] == pytest.approx(schedule(2) / schedule(1), rel=1e-6)  # warming up over 4 steps
    assert lr[0] > 5 * base_lr[0]  # the preset's 1e-4 over 20 warm-up steps starts far lower
    checkpoint = torch.load(sorted(out.glob("checkpoints/step-*.pt"))[-1], map_location="cpu", weights_only=False)
    patch = checkpoint["model"]["clip.visual.conv1.weight"]
    baseline = torch.load(sorted(pretrained.glob("checkpoints/step-*.pt"))[-1], map_location="cpu", weights_only=False)
    assert patch.abs().max() < 0.1 * baseline["model"]["clip.visual.conv1.weight"].abs().max()
    assert "dali" in checkpoint["loader"] and "dali" not in baseline["loader"]
    assert checkpoint["config"]["loader"] == "dali" and checkpoint["config"]["clip_weights"] == str(clip)


@pytest.mark.slow
def test_pretrain_seed_draws_the_weights_and_batches_and_preset(pretrained, pretrain_data, tmp_path):
    ok("pretrain", "--data", pretrain_data, "--out", tmp_path / "seed0", *PRETRAIN, "--seed", 0, "--preset", "tiny")
    ok("pretrain", "--data", pretrain_data, "--out", tmp_path / "seed1", *PRETRAIN, "--seed", 1)
    # The baseline ran the tiny preset with the default seed 0: the same run again, step for step.
    assert [m["loss"] for m in metrics(tmp_path / "seed0")] == [m["loss"] for m in metrics(pretrained)]
    assert metrics(tmp_path / "seed1")[0]["loss"] != metrics(pretrained)[0]["loss"]
    first = {n: torch.load(sorted((tmp_path / n).glob("checkpoints/step-*.pt"))[-1], map_location="cpu",
                           weights_only=False)["model"] for n in ("seed0", "seed1")}
    assert any(not torch.equal(v, first["seed1"][k]) for k, v in first["seed0"].items())
    result = invoke("pretrain", "--data", pretrain_data, "--out", tmp_path / "none", *PRETRAIN, "--preset", "no-such-preset")
    assert result.exit_code == 2 and "unknown preset 'no-such-preset'" in result.stderr


def _voc(root: Path, split: str, count: int, seed: int) -> None:
    from magicseg_engine.evaluate.datasets import LAYOUTS

    layout, rng = LAYOUTS["voc"], np.random.default_rng(seed)
    ids = [f"{split}{i:03d}" for i in range(count)]
    for i in ids:
        for folder, suffix, array in ((layout.image_dir, ".jpg", rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)),
                                      (layout.label_dir, layout.label_suffix, rng.integers(0, 21, (40, 56), dtype=np.uint8))):
            path = root / folder.format(split=split) / f"{i}{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path)
    split_file = root / layout.split_file.format(split=split)
    split_file.parent.mkdir(parents=True, exist_ok=True)
    split_file.write_text("\n".join(ids) + "\n")


@pytest.mark.slow
def test_evaluate_split_limit_short_side_and_precision(pretrained, tmp_path):
    root = tmp_path / "voc"
    _voc(root, "val", 3, 0)
    _voc(root, "train", 2, 1)
    common = ["--checkpoint", pretrained, "--dataset", "voc", "--root", root, "--workers", 0, "--device", "cpu"]
    ok("evaluate", *common, "--split", "train", "--json", tmp_path / "train.json", "--save-predictions", tmp_path / "p1")
    ok("evaluate", *common, "--split", "train", "--limit", 1, "--short-side", 32, "--precision", "bf16",
       "--json", tmp_path / "quick.json", "--save-predictions", tmp_path / "p2")
    full, quick = (json.loads((tmp_path / n).read_text()) for n in ("train.json", "quick.json"))
    assert (full["split"], full["images"]) == ("train", 2)  # not val's 3
    assert (quick["split"], quick["images"]) == ("train", 1)
    assert quick["settings"]["short_side"] == 32 and quick["settings"]["precision"] == "bf16"
    assert full["settings"]["precision"] == "fp32"
    assert sorted(p.name for p in (tmp_path / "p2").iterdir()) == ["train000.png"]
    # Scored at another scale and precision: the same image gets another prediction.
    first = [np.asarray(Image.open(tmp_path / p / "train000.png")) for p in ("p1", "p2")]
    assert first[0].shape == first[1].shape == (40, 56) and (first[0] != first[1]).any()


# --- bench quality -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_bench_quality_random_weights_sweep_and_picture(tmp_path, monkeypatch):
    import functools

    from magicseg_engine.bench import denoiser

    # The denoiser ranking (72 images, each against every caption) is not under test here and
    # would take minutes on a CPU; one image, one draw and one timestep keep it to seconds.
    monkeypatch.setattr(denoiser, "denoiser_ranking",
                        functools.partial(denoiser.denoiser_ranking, images=1, draws=1, timesteps=(500,)))
    out, picture = tmp_path / "q.json", tmp_path / "pairs.png"
    ok("bench", "quality", "--pairs", 2, "--steps", 2, "--batch-size", 2, "--device", "cpu", "--random-weights",
       "--weights-seed", 1, "--guidance", 2.0, "--sweep", "--picture", picture, "--json", out)
    saved = json.loads(out.read_text())
    assert saved["model_id"].startswith("shapes-random:seed=1:")  # not the shipped weights
    assert saved["guidance"] == 2.0 and saved["sweep"] and {"miou", "factors", "steps"} <= set(saved["sweep"][0])
    assert Image.open(picture).size[0] > 0
