"""`shortft eval`: folders with each prompt sidecar, metrics, CSV/JSON outputs, HPDv2 prompts, the run hook."""

from __future__ import annotations

import argparse
import csv
import gc
import json
import weakref

import pytest
import torch
from PIL import Image

from shortft import evaluate
from shortft.rewards.jpeg import jpeg_size_kb
from shortft.rewards.symmetry import asymmetry
from shortft.rewards.testing import make_tiny_clip

PROMPTS = ["a red circle on the left", "a small blue square at the top", "a green triangle on a white background"]


def write_folder(folder, sidecar: str, n: int = 3, size: int = 48):
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    files = [f"img{i}.png" for i in range(n)]
    for i, f in enumerate(files):
        arr = (torch.rand(size, size + 8 * i, 3, generator=g) * 255).byte().numpy()  # sizes differ
        Image.fromarray(arr).save(folder / f)
    prompts = PROMPTS[:n]
    if sidecar == "json":
        (folder / "prompts.json").write_text(json.dumps(dict(zip(files, prompts))))
    elif sidecar == "csv":
        with open(folder / "prompts.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["file", "prompt", "extra"])
            w.writerows([f, p, "x"] for f, p in zip(files, prompts))
    elif sidecar == "txt":
        (folder / "prompts.txt").write_text("\n".join(prompts) + "\n")
    else:
        for f, p in zip(files, prompts):
            (folder / f).with_suffix(".txt").write_text(p)
    return files, prompts


def parse(argv):
    parser = argparse.ArgumentParser()
    evaluate.register(parser.add_subparsers(dest="cmd"))
    return parser.parse_args(argv)


@pytest.mark.parametrize("sidecar", ["json", "csv", "txt", "stem"])
def test_load_folder_sidecars(tmp_path, sidecar):
    files, prompts = write_folder(tmp_path / "imgs", sidecar)
    names, images, got = evaluate.load_folder(tmp_path / "imgs")
    assert names == files and got == prompts
    assert images[1].shape == (3, 48, 56) and 0 <= float(images[0].min()) and float(images[0].max()) <= 1


def test_missing_prompts_is_an_error(tmp_path):
    write_folder(tmp_path / "imgs", "txt")
    (tmp_path / "imgs" / "prompts.txt").write_text("only one\n")
    with pytest.raises(ValueError, match="1 prompts for 3 images"):
        evaluate.load_folder(tmp_path / "imgs")
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        evaluate.score_images(torch.rand(3, 3, 8, 8), ["a", "b"], ["asymmetry"])


def test_score_images_values_and_groups():
    x = torch.rand(4, 3, 16, 16)
    res = evaluate.score_images(x, ["a"] * 4, ["asymmetry", "jpeg_kb"], batch_size=3, groups=["u", "u", "v", "v"])
    torch.testing.assert_close(torch.tensor(res["per_image"]["asymmetry"]), asymmetry(x))
    torch.testing.assert_close(torch.tensor(res["per_image"]["jpeg_kb"]), jpeg_size_kb(x))
    assert res["by_group"]["v"]["jpeg_kb"] == pytest.approx(float(jpeg_size_kb(x[2:]).mean()))
    assert res["prompt_fidelity"].startswith("not world prompts")


def test_named_metrics_are_built_one_at_a_time(monkeypatch):
    """By name, each reward model is built when its turn comes and gone before the next is built."""
    live, alive_at_build, built = weakref.WeakSet(), [], []

    class Model:
        def __init__(self, scale: float):
            self.scale = scale

        def __call__(self, images, prompts):
            return self.scale * images.mean(dim=(1, 2, 3))

    def fake_build(name, settings=None):
        if name == "aesthetic":
            raise ImportError("no aesthetic package here")
        gc.collect()
        alive_at_build.append(len(live))
        built.append(name)
        model = Model(float(len(built)))
        live.add(model)
        return model

    monkeypatch.setattr(evaluate, "build_metric", fake_build)
    x = torch.rand(3, 3, 8, 8)
    res = evaluate.score_images(x, ["a"] * 3, ["hpsv2", "aesthetic", "pickscore", "asymmetry"], fidelity=False)
    assert built == ["hpsv2", "pickscore", "asymmetry"] and alive_at_build == [0, 0, 0]
    torch.testing.assert_close(torch.tensor(res["per_image"]["pickscore"]), 2 * x.mean(dim=(1, 2, 3)))
    assert res["summary"]["hpsv2"]["mean"] == pytest.approx(float(x.mean()))
    assert res["skipped"] == {"aesthetic": "no aesthetic package here"} and "prompt_fidelity" not in res
    with pytest.raises(ValueError, match="unknown metrics \\['nope'\\]"):
        evaluate.score_images(x, ["a"] * 3, ["asymmetry", "nope"])


def test_eval_cli_writes_csv_json_and_table(tmp_path, capsys):
    files, prompts = write_folder(tmp_path / "imgs", "json")
    clip = make_tiny_clip(tmp_path / "world_clip", image_size=64, patch=8, mean=(0.5,) * 3, std=(0.5,) * 3)
    args = parse(["eval", str(tmp_path / "imgs"), "--metrics", "world_clip,asymmetry,jpeg_kb,hpsv2,prompt_fidelity",
                  "--reward-paths", f"world_clip={clip},hpsv2={tmp_path / 'absent.pt'}", "--out",
                  str(tmp_path / "out"), "--device", "cpu"])
    result = args.func(args)
    printed = capsys.readouterr().out
    assert "| world_clip |" in printed and "| hpsv2 | skipped |" in printed
    rows = list(csv.DictReader(open(tmp_path / "out" / "scores.csv")))
    assert [r["file"] for r in rows] == files and [r["prompt"] for r in rows] == prompts
    assert set(rows[0]) == {"file", "prompt", "world_clip", "asymmetry", "jpeg_kb"}
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["n"] == 3 and "does not exist" in summary["skipped"]["hpsv2"]
    assert summary["summary"]["jpeg_kb"]["mean"] == pytest.approx(result["summary"]["jpeg_kb"]["mean"])
    assert 0 <= summary["prompt_fidelity"]["mean"] <= 1  # world prompts: the world evaluator ran


def test_hpdv2_prompts_and_run_hook(tmp_path, monkeypatch):
    bench = tmp_path / "hpdv2"
    bench.mkdir()
    (bench / "anime.json").write_text(json.dumps(["a cat", "a dog", "a fox"]))
    (bench / "photo.txt").write_text("a car\na tree\n")
    assert evaluate.load_hpdv2(str(bench), ["anime", "photo"], limit=2) == [
        ("anime", "a cat"), ("anime", "a dog"), ("photo", "a car"), ("photo", "a tree")]
    with pytest.raises(FileNotFoundError, match="paintings"):
        evaluate.load_hpdv2(str(bench), ["paintings"])
    with pytest.raises(ValueError, match="unknown HPDv2 styles"):
        evaluate.load_hpdv2(str(bench), ["cartoon"])

    from shortft import sample

    calls = []

    def fake_sample_run(run_dir, prompts, seeds):
        calls.append((run_dir, list(prompts), list(seeds)))
        return torch.rand(len(prompts), 3, 32, 32)

    monkeypatch.setattr(sample, "sample_run", fake_sample_run)
    args = parse(["eval", "--run", str(tmp_path / "run"), "--hpdv2", str(bench), "--styles", "anime,photo",
                  "--limit", "1", "--seeds", "0,1", "--metrics", "asymmetry", "--device", "cpu"])
    result = args.func(args)
    assert calls == [(str(tmp_path / "run"), ["a cat", "a cat", "a car", "a car"], [0, 1, 0, 1])]
    assert set(result["by_group"]) == {"anime", "photo"}
    assert len(list((tmp_path / "run" / "eval" / "images").glob("*.png"))) == 4
