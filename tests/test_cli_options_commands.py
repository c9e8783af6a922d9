"""Options that several commands share, run on each command that offers them.

test_cli_options.py's inventory asks for every (command, option) pair: an option tested on
`generate` says nothing of the same option on `bench fast`. These runs use each command's smallest
settings; where a command's JSON does not say which models it timed, a spy wraps the function that
builds or times them (the real one still runs) and reads that off its arguments.
"""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from families import write_family
from magicseg_engine.cli import app

# Where a bench runs without a mask stage or SAM comparison, one pair, one timed repetition.
ONCE = ["--reps", 1, "--warmup", 0, "--device", "cpu"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def refused(*args, message: str):
    result = invoke(*args)
    assert result.exit_code == 2 and message in result.stderr, result.output
    return result


def spy(monkeypatch, module, name):
    """Wrap `module.name` (read by the commands at call time): each call's arguments and result are
    kept, and the real function still runs."""
    calls = []
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append({"args": args, "kwargs": kwargs, "result": result})
        return result

    monkeypatch.setattr(module, name, wrapper)
    return calls


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def sampler_models(monkeypatch) -> list:
    """Spies on build_sampler: `model_ids(calls)` lists the model of every sampler built since."""
    from magicseg_engine import pipeline

    return spy(monkeypatch, pipeline, "build_sampler")


def model_ids(calls: list) -> list[str]:
    return [c["result"].models.model_id for c in calls]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A small SD 1.x diffusers folder: what --model loads with the shapes preset (32 px, tiny SAM)."""
    return write_family(tmp_path_factory.mktemp("model") / "sd1", "sd1", seed=0)


def from_folder(model_id: str, folder: Path) -> bool:
    return model_id.startswith(f"{folder}@")


def random_of_seed(model_id: str, seed: int) -> bool:
    return model_id.startswith(f"tiny-random:seed={seed}:")


# --- bench unet, pipeline, sam: the suite's sampler benches ------------------------------------------

@pytest.mark.slow
def test_bench_unet_model_preset_weights_seed_and_batch_size(folder, monkeypatch, tmp_path):
    from magicseg_engine.bench import unet

    calls = spy(monkeypatch, unet, "bench_unet")
    ok("bench", "unet", "--preset", "shapes", "--model", folder, "--batch-size", 1, *ONCE, "--json", tmp_path / "f.json")
    ok("bench", "unet", "--preset", "tiny", "--weights-seed", 3, "--batch-size", 3, *ONCE, "--json", tmp_path / "s.json")
    shapes, seeded = read(tmp_path / "f.json"), read(tmp_path / "s.json")
    # --preset shapes: its 32 px images, from the folder's weights rather than the shipped ones.
    assert from_folder(shapes["settings"]["model"], folder) and shapes["settings"]["height"] == 32
    assert random_of_seed(seeded["settings"]["model"], 3) and seeded["settings"]["height"] == 64
    # --batch-size joins the batches always timed (1, 2, 4); --reps and --warmup reach the timer.
    assert calls[0]["args"][1] == [1, 2, 4] and calls[1]["args"][1] == [1, 2, 3, 4]
    assert (seeded["settings"]["reps"], seeded["settings"]["warmup"]) == (1, 0)
    assert seeded["machine"]["device"] == "cpu"


@pytest.mark.slow
def test_bench_pipeline_options(folder, monkeypatch, tmp_path):
    from magicseg_engine.bench import pipeline

    calls = spy(monkeypatch, pipeline, "bench_pipeline")
    ok("bench", "pipeline", "--preset", "tiny", "--weights-seed", 3, "--pairs", 1, "--batch-size", 3, *ONCE,
       "--json", tmp_path / "p.json")
    saved = read(tmp_path / "p.json")
    assert random_of_seed(saved["settings"]["model"], 3)
    assert saved["settings"]["pairs"] == 1 and len(calls[0]["args"][3]) == 1  # one prompt record rendered
    assert calls[0]["args"][4] == [1, 2, 3, 4]  # --batch-size joins the batch sizes compared
    assert (saved["settings"]["reps"], saved["settings"]["warmup"]) == (1, 0) and saved["machine"]["device"] == "cpu"
    # --preset shapes --model: the folder's weights, prompts from the shapes world's classes.
    ok("bench", "pipeline", "--preset", "shapes", "--model", folder, "--pairs", 1, "--batch-size", 1, *ONCE,
       "--json", tmp_path / "f.json")
    shapes = read(tmp_path / "f.json")
    assert from_folder(shapes["settings"]["model"], folder)


@pytest.mark.slow
def test_bench_sam_options(folder, monkeypatch, tmp_path):
    from magicseg_engine.bench import masks
    from magicseg_engine.masks.sam import build_sam

    calls = spy(monkeypatch, masks, "bench_sam_refinement")
    ok("bench", "sam", "--preset", "tiny", "--weights-seed", 3, "--pairs", 1, *ONCE, "--json", tmp_path / "s.json")
    saved = read(tmp_path / "s.json")
    (call,) = calls
    sampler, refiner = call["args"][:2]
    assert random_of_seed(sampler.models.model_id, 3)
    # The SAM timed is the random tiny SAM of weights seed 3.
    expected = build_sam("tiny", seed=3).state_dict()
    assert all(torch.equal(v.cpu(), expected[k]) for k, v in refiner.sam.state_dict().items())
    assert saved["images"] == 1 and len(call["args"][2]) == 1  # --pairs 1: one image's prompts
    assert (call["kwargs"]["reps"], call["kwargs"]["warmup"]) == (1, 0) and saved["batched"]["reps"] == 1
    assert saved["machine"]["device"] == "cpu"
    # --preset shapes --model: the sampler that draws the images SAM refines is the folder's.
    ok("bench", "sam", "--preset", "shapes", "--model", folder, "--pairs", 1, *ONCE, "--json", tmp_path / "f.json")
    assert from_folder(calls[1]["args"][0].models.model_id, folder)


@pytest.mark.slow
def test_bench_all_weights_seed_and_model(folder, monkeypatch, tmp_path):
    from magicseg_engine.bench import suite

    # `bench all` runs every bench on one context; each has its own test. Running only `unet` here
    # keeps this to seconds and still shows the context was built from --weights-seed.
    monkeypatch.setattr(suite, "BENCHES", {"unet": suite.BENCHES["unet"]})
    ok("bench", "all", "--preset", "tiny", "--weights-seed", 3, "--batch-size", 1, "--pairs", 1, *ONCE,
       "--json", tmp_path / "a.json")
    saved = read(tmp_path / "a.json")
    assert list(saved["results"]) == ["unet"] and random_of_seed(saved["results"]["unet"]["settings"]["model"], 3)
    ok("bench", "all", "--preset", "shapes", "--model", folder, "--batch-size", 1, "--pairs", 1, *ONCE,
       "--json", tmp_path / "f.json")
    assert from_folder(read(tmp_path / "f.json")["results"]["unet"]["settings"]["model"], folder)


# --- bench losses, loader, train: the pretraining model's benches -----------------------------------

@pytest.mark.slow
def test_bench_losses_preset_reps_and_warmup(tmp_path):
    from magicseg_engine.train.loop import load_pretrain_preset

    ok("bench", "losses", "--preset", "sd15-random", *ONCE, "--json", tmp_path / "l.json")
    saved = read(tmp_path / "l.json")
    config = load_pretrain_preset("sd15-random")  # not the tiny default's batch or decoder
    assert saved["preset"] == "sd15-random" and saved["shapes"]["batch"] == config.batch_size
    assert (saved["shapes"]["reps"], saved["shapes"]["warmup"]) == (1, 0) and saved["machine"]["device"] == "cpu"


@pytest.mark.slow
def test_bench_loader_preset_and_json(tmp_path):
    from magicseg_engine.train.loop import load_pretrain_preset

    ok("bench", "loader", "--preset", "tiny", "--device", "cpu", "--json", tmp_path / "l.json")
    saved = read(tmp_path / "l.json")
    assert saved["image_size"] == load_pretrain_preset("tiny").model.image_size and saved["machine"]["device"] == "cpu"
    # The other presets load a ViT-B/16 (minutes here): a name none has is refused.
    refused("bench", "loader", "--preset", "no-such-preset", "--device", "cpu", message="unknown preset 'no-such-preset'")


@pytest.mark.slow
def test_bench_train_preset_reps_and_warmup(tmp_path):
    ok("bench", "train", "--preset", "tiny", *ONCE, "--json", tmp_path / "t.json")
    saved = read(tmp_path / "t.json")
    assert (saved["reps"], saved["warmup"], saved["step"]["eager"]["reps"]) == (1, 0, 1)
    assert saved["preset"] == "tiny" and saved["machine"]["device"] == "cpu"
    refused("bench", "train", "--preset", "no-such-preset", "--device", "cpu", message="unknown preset 'no-such-preset'")


# --- the other benches ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_bench_fast_model_size_steps_and_weights_seed(folder, monkeypatch, tmp_path):
    built = sampler_models(monkeypatch)
    common = ["--levels", 1, "--pairs", 1, "--reps", 1, "--device", "cpu"]
    ok("bench", "fast", "--preset", "shapes", "--model", folder, "--size", 16, "--steps", 2, *common,
       "--json", tmp_path / "f.json")
    ok("bench", "fast", "--preset", "tiny", "--weights-seed", 3, "--size", 32, "--steps", 2, *common,
       "--json", tmp_path / "s.json")
    shapes, seeded = read(tmp_path / "f.json"), read(tmp_path / "s.json")
    first, second = model_ids(built)
    assert from_folder(first, folder) and random_of_seed(second, 3)
    # Not the presets' own 32 px / 20 steps (shapes) and 64 px / 4 steps (tiny).
    assert (shapes["size"], shapes["steps"]) == ([16, 16], 2) and (seeded["size"], seeded["steps"]) == ([32, 32], 2)


@pytest.mark.slow
def test_bench_generate_model_and_dtype(folder, tmp_path):
    ok("bench", "generate", "--preset", "shapes", "--model", folder, "--dtype", "bfloat16", "--pairs", 1,
       "--batch-size", 1, "--steps", 1, *ONCE, "--json", tmp_path / "g.json")
    settings = read(tmp_path / "g.json")["settings"]
    assert from_folder(settings["model"], folder) and settings["dtype"] == "bfloat16"  # the preset's is float32


@pytest.mark.slow
def test_bench_masks_preset_and_weights_seed(monkeypatch, tmp_path):
    from magicseg_engine.config import load_preset
    from magicseg_engine.generate.models import model_identity

    built = sampler_models(monkeypatch)
    common = ["--pairs", 1, "--size", 32, "--steps", 1, "--no-sam", *ONCE]
    ok("bench", "masks", "--preset", "shapes", *common, "--json", tmp_path / "shapes.json")
    ok("bench", "masks", "--preset", "tiny", "--weights-seed", 3, *common, "--json", tmp_path / "seed.json")
    shapes, seeded = model_ids(built)
    assert shapes == model_identity(load_preset("shapes").diffusion) and random_of_seed(seeded, 3)
    assert read(tmp_path / "shapes.json")["settings"]["preset"] == "shapes"


@pytest.mark.slow
def test_bench_tune_model_weights_seed_and_encode_workers(folder, monkeypatch, tmp_path):
    from magicseg_engine import config

    # bench tune has no --steps, and the shapes preset's 20 steps per pair (rendered by every variant
    # and the reference) are not under test here: 2 keep this to seconds.
    shapes = config.PRESETS["shapes"]
    monkeypatch.setitem(config.PRESETS, "shapes", {**shapes, "diffusion": {**shapes["diffusion"], "steps": 2}})
    built = sampler_models(monkeypatch)
    common = ["--variants", "torch:float32", "--batch-sizes", 1, "--pairs", 1, "--reference-pairs", 1, *ONCE]
    ok("bench", "tune", "--preset", "shapes", "--model", folder, "--encode-workers", 1, *common,
       "--json", tmp_path / "f.json")
    from_shapes = model_ids(built)
    built.clear()
    ok("bench", "tune", "--preset", "tiny", "--weights-seed", 3, *common, "--json", tmp_path / "s.json")
    assert from_shapes and all(from_folder(i, folder) for i in from_shapes)
    assert model_ids(built) and all(random_of_seed(i, 3) for i in model_ids(built))
    shapes, seeded = read(tmp_path / "f.json"), read(tmp_path / "s.json")
    assert shapes["model"] == str(folder) and seeded["settings"]["weights_seed"] == 3
    assert shapes["settings"]["encode_workers"] == 1 and seeded["settings"]["encode_workers"] == 4  # the default


@pytest.mark.slow
def test_bench_schedulers_model_and_seed(folder, tmp_path):
    common = ["--schedulers", "ddim", "--steps", "2", "--pairs", 1, "--batch-size", 1, "--device", "cpu"]
    ok("bench", "schedulers", *common, "--model", folder, "--seed", 1, "--json", tmp_path / "s.json")
    saved = read(tmp_path / "s.json")
    assert from_folder(saved["model_id"], folder) and saved["seed"] == 1


@pytest.mark.slow
def test_bench_quality_model_and_seed(folder, monkeypatch, tmp_path):
    import functools

    from magicseg_engine.bench import denoiser, quality

    # The denoiser ranking is not under test (see test_cli_options.py): one image, one draw.
    monkeypatch.setattr(denoiser, "denoiser_ranking",
                        functools.partial(denoiser.denoiser_ranking, images=1, draws=1, timesteps=(500,)))
    runs = spy(monkeypatch, quality, "run_quality")
    common = ["--pairs", 2, "--steps", 2, "--batch-size", 2, "--device", "cpu"]
    ok("bench", "quality", *common, "--model", folder, "--seed", 1, "--json", tmp_path / "q.json")
    saved = read(tmp_path / "q.json")
    assert from_folder(saved["model_id"], folder) and saved["seed"] == 1
    # --seed draws the prompts: those rendered are the ones the world's prompts of seed 1 give.
    config, records = runs[0]["args"][:2]
    assert config.prompts.seed == 1 and [r.seed for r in records] == [r.seed for r in _world_prompts(1, 2)]
    assert [r.seed for r in records] != [r.seed for r in _world_prompts(0, 2)]


def _world_prompts(seed: int, n: int):
    from magicseg_engine.config import load_preset
    from magicseg_engine.prompts import build_prompts
    from magicseg_engine.vocab import load_vocabulary

    config = load_preset("shapes", {"seed": seed, "prompts": {"seed": seed}})
    return build_prompts(config.prompts, vocab=load_vocabulary("shapes"), num=n).records


@pytest.mark.slow
def test_bench_ablation_seed_text_tower_and_bg_threshold(tmp_path):
    work = tmp_path / "abl"
    ok("bench", "ablation", "--work", work, "--pairs", 2, "--steps", 1, "--eval-images", 1, "--seed", 1,
       "--text-tower", "random", "--bg-threshold", 0.3, "--device", "cpu", "--json", tmp_path / "a.json")
    saved = read(tmp_path / "a.json")
    assert (saved["seed"], saved["text_tower"], saved["bg_threshold"]) == (1, "random", 0.3)
    # The pairs were generated with seed 1, and no arm started from the shapes text encoder.
    assert read(work / "generated" / "run.json")["config"]["seed"] == 1
    assert read(work / "pretrain-counterfactual" / "pretrain.json")["config"]["clip_weights"] is None


@pytest.mark.slow
def test_bench_backends_weights_seed_and_its_older_name(tmp_path):
    engines = tmp_path / "engines"
    ok("build-engines", "--out", engines, "--components", "text-encoder", "--weights-seed", 1, "--device", "cpu")
    common = ["--engines", engines, "--components", "text-encoder", "--batch-sizes", 1, *ONCE]
    ok("bench", "backends", *common, "--weights-seed", 1, "--json", tmp_path / "w.json")
    ok("bench", "backends", *common, "--seed", 1, "--json", tmp_path / "s.json")
    assert random_of_seed(read(tmp_path / "w.json")["model"], 1) and random_of_seed(read(tmp_path / "s.json")["model"], 1)
    # The engines hold weights seed 1's models: the default seed's are not theirs.
    result = invoke("bench", "backends", *common, "--json", tmp_path / "0.json")
    assert result.exit_code == 2 and not (tmp_path / "0.json").exists(), result.output


@pytest.mark.slow
def test_build_engines_sam_checkpoint(tmp_path):
    from magicseg_engine.masks.sam import build_sam

    checkpoint = tmp_path / "sam-tiny-seed7.pth"
    torch.save(build_sam("tiny", seed=7).state_dict(), checkpoint)
    common = ["--components", "sam-mask-decoder", "--sam-model", "tiny", "--device", "cpu"]
    ok("build-engines", "--out", tmp_path / "file", *common, "--sam-checkpoint", checkpoint)
    ok("build-engines", "--out", tmp_path / "seed7", *common, "--weights-seed", 7)
    ok("build-engines", "--out", tmp_path / "seed0", *common)
    digest = {n: read(tmp_path / n / "manifest.json")["components"][0]["sha256"] for n in ("file", "seed7", "seed0")}
    # The file holds weights seed 7's SAM, exported under the default weights seed 0.
    assert digest["file"] == digest["seed7"] != digest["seed0"]


@pytest.mark.slow
def test_bench_pretrain_preset():
    # The other pretraining presets load a ViT-B/16 (minutes here): a name none has is refused.
    refused("bench", "pretrain", "--preset", "no-such-preset", "--samples", 16, "--device", "cpu",
            message="unknown preset 'no-such-preset'")


# --- train-world and train-world-sam: --seed ------------------------------------------------------------

def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {f"{p.relative_to(folder)}:{k}": v for p in sorted(folder.rglob("*.safetensors")) for k, v in load_file(p).items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_train_world_seed(tmp_path):
    """--seed draws the scenes, the initial weights and the batches: one step's weights show it."""
    flags = ["--samples", 8, "--vae-steps", 1, "--unet-steps", 1, "--batch-size", 2, "--size", 32, "--device", "cpu"]
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        ok("train-world", "--out", tmp_path / name, "--seed", seed, *flags)
    a, b, c = (_weights(tmp_path / n) for n in "abc")
    assert a and _same(a, b) and not _same(a, c)


@pytest.mark.slow
def test_train_world_sam_seed(tmp_path):
    from magicseg_engine.world.sam import SAM_FILE

    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        ok("train-world-sam", "--out", tmp_path / name, "--seed", seed, "--steps", 1, "--batch-size", 1)
    a, b, c = (torch.load(tmp_path / n / SAM_FILE, map_location="cpu", weights_only=True) for n in "abc")
    assert _same(a, b) and not _same(a, c)
