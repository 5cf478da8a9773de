"""The user's own code in every rank: ``yolosafe.train(callbacks=..., trainer=...)`` and the command line's
``callbacks=module:function`` / ``trainer=module:Class``. References are pure functions (fast); one real 2-rank run
(fake GPUs) of a script whose ``__main__`` defines a callback and a trainer subclass proves both reach both ranks."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import cli_env
from yolosafe.api import calls
from yolosafe.errors import UsageError
from yolosafe.planning import options, usercode


def on_fit_epoch_end(trainer):  # importable by name: tests.test_usercode:on_fit_epoch_end
    return trainer


def test_importable_objects_travel_by_name_the_others_by_value():
    local = lambda trainer: trainer  # noqa: E731 - a notebook's lambda
    refs = usercode.refs({"on_fit_epoch_end": [on_fit_epoch_end, local]}, trainer="pkg.mod:MyTrainer")
    root = str(Path(__file__).resolve().parents[1])  # where this process imported ``tests`` from
    assert refs["callbacks"][0] == ["on_fit_epoch_end", {"name": "tests.test_usercode:on_fit_epoch_end", "path": root}]
    assert "pickle" in refs["callbacks"][1][1] and usercode.load(refs["callbacks"][1][1])(7) == 7
    assert refs["trainer"] == {"name": "pkg.mod:MyTrainer"}
    assert usercode.load(refs["callbacks"][0][1]) is on_fit_epoch_end


def test_a_module_found_on_a_path_the_user_added_loads_in_a_fresh_interpreter(tmp_path, monkeypatch):
    """A notebook's ``sys.path.append(folder)`` (or a test runner's root): a rank starts without it, and still
    imports the callback by name from where the user's process found it."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "__init__.py").write_text("")
    (tmp_path / "mine" / "cbs.py").write_text("def on_train_start(trainer):\n    return 'mine'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from mine import cbs  # type: ignore[import-not-found]

    ref = usercode.ref_of(cbs.on_train_start, "callback")
    assert ref == {"name": "mine.cbs:on_train_start", "path": str(tmp_path)}
    rank = ("import json, sys; from yolosafe.planning import usercode; "
            "print(usercode.load(json.loads(sys.argv[1]))(None))")
    done = subprocess.run([sys.executable, "-c", rank, json.dumps(ref)], capture_output=True, text=True, timeout=60,
                          cwd="/")
    assert done.returncode == 0 and done.stdout.strip() == "mine", done.stderr


def test_an_unserialisable_callback_is_one_usage_error_line():
    lock = threading.Lock()

    def holds_a_lock(trainer):
        return lock

    with pytest.raises(UsageError) as caught:
        calls.given_of({"callbacks": {"on_train_start": holds_a_lock}})
    assert "\n" not in str(caught.value) and "cannot be sent to the ranks" in str(caught.value)
    with pytest.raises(UsageError, match="not an Ultralytics callback event"):
        usercode.refs({"fit_end": on_fit_epoch_end})


def test_command_line_words_name_them():
    given = options.yolo_style({"args": ["callbacks=tests.test_usercode:on_fit_epoch_end", "trainer=m:T", "lr0=0.02"]})
    assert given["args"] == ["lr0=0.02"]
    assert given["user_code"] == {"callbacks": [["on_fit_epoch_end", {"name": "tests.test_usercode:on_fit_epoch_end"}]],
                                  "trainer": {"name": "m:T"}}
    with pytest.raises(UsageError, match="module:function"):
        usercode.refs("justaname")


SCRIPT = '''
import json, os, sys
import yolosafe
from ultralytics.models.yolo.detect import DetectionTrainer

OUT = sys.argv[1]


class HeavierBoxes(DetectionTrainer):  # a custom loss weight, defined in __main__
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.args.box = 11.5


def record(trainer):  # a callback defined in __main__: one file per rank
    from ultralytics.utils.torch_utils import unwrap_model
    rank = int(os.environ.get("RANK", -1))
    model = unwrap_model(trainer.model)
    with open(os.path.join(OUT, f"rank{rank}.json"), "w") as f:
        json.dump({"box": model.args.box, "hyp_box": getattr(getattr(model, "criterion", None), "hyp", None)
                   and model.criterion.hyp.box, "mro": [c.__name__ for c in type(trainer).__mro__]}, f)


yolosafe.train(data="shapes", device=[0, 1], epochs=1, imgsz=32, batch=4, workers=0, plots=False, val=False,
               callbacks={"on_train_epoch_end": record}, trainer=HeavierBoxes)
'''


@pytest.mark.slow
def test_main_defined_callback_and_trainer_run_in_both_ranks(tmp_path: Path, shared_cache: Path):
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run([sys.executable, str(script), str(out)], cwd=tmp_path, capture_output=True, text=True,
                            env=cli_env(shared_cache, {"YOLOSAFE_FAKE_GPUS": "2x24GB"}), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = {p.name: json.loads(p.read_text()) for p in out.glob("rank*.json")}
    assert set(seen) == {"rank0.json", "rank1.json"}, (seen, result.stderr[-2000:])
    for record in seen.values():
        assert record["box"] == 11.5 and "HeavierBoxes" in record["mro"] and record["mro"][0].startswith(
            ("Safe", "Cpu"))
        assert record["hyp_box"] in (None, 11.5)  # the loss reads the same hyperparameters


def test_a_resume_keeps_the_last_attempts_callbacks(tmp_path):
    from tests.test_misuse import fake_run
    from yolosafe.planning import resume
    from yolosafe.rundir import files as rundir
    from yolosafe.rundir import records
    from yolosafe.rundir.layout import RunDir

    run = fake_run(tmp_path)
    code = usercode.refs({"on_fit_epoch_end": on_fit_epoch_end})
    rundir.write_json(RunDir(run).spec(1), {"user_code": code})
    assert resume.last_user_code(RunDir(run), records.load_story(run)) == code
