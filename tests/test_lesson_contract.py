"""The contract of a lesson and a lab (stages/lesson.py's Lesson, stages/pitfall.py's Lab):
a field it must declare and does not fails as its module is imported, with one line
naming the file and the field; run as a script, that line is all it prints."""
import glob
import os
import subprocess
import sys
import textwrap

import pytest

from kernel import ROOT, load_file

STAGES = os.path.join(ROOT, "stages")

LESSON = '''
from lesson import Lesson
LESSON = Lesson("99", "broken", goal={goal!r}, picture={picture!r}, skips={skips!r})


def build(L):
    L.step("a step", skip="used")


if __name__ == "__main__":
    LESSON.main(build, lambda L: None)
'''

LAB_FIELDS = {"works": '"it works"', "breaks": '"it breaks"', "symptom": '"a symptom"', "reveals": '"a reveal"',
              "fixes": '"a fix"', "cause": '"forward-drop"', "doctor": '("pod1", "pod2")', "setup": "step",
              "check": "step", "breakage": "step", "reveal": "step", "fix": "step"}

LAB = '''
import pitfall
from lesson import Lesson
LESSON = Lesson("29", "pitfall_broken", goal="a goal", picture="a picture", skips={{"fix": "stays broken"}})


def step(L, expect_fail=False):
    return True


LAB = pitfall.Lab(LESSON, {fields})
'''


def write(tmp_path, text, name="99_broken.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def import_fails(path, *words):
    """Importing PATH raises ContractError: one line that starts with the file's name and holds WORDS."""
    from lesson import ContractError
    with pytest.raises(ContractError) as caught:
        load_file(path, "broken_stage")
    line = str(caught.value)
    assert "\n" not in line
    assert line.startswith(os.path.relpath(path, ROOT) + ": "), line
    for word in words:
        assert word in line, line
    return line


def lesson(tmp_path, goal="a goal", picture="a picture", skips=None):
    return write(tmp_path, LESSON.format(goal=goal, picture=picture, skips=skips or {"used": "it breaks"}))


def test_a_whole_lesson_imports(tmp_path):
    assert load_file(lesson(tmp_path), "whole_stage").LESSON.goal == "a goal"


@pytest.mark.parametrize("fields,words", [
    (dict(goal=""), ["lesson 99", "no goal"]),
    (dict(picture="  "), ["lesson 99", "no picture"]),
    (dict(skips={"used": "it breaks", "nowhere": "nothing"}), ["skip 'nowhere' names no step"]),
    (dict(skips={"used": ""}), ["skip 'used' does not say what breaks"]),
])
def test_a_lesson_missing_a_field_fails_at_import_naming_file_and_field(tmp_path, fields, words):
    import_fails(lesson(tmp_path, **fields), *words)


def test_a_whole_lab_imports(tmp_path):
    fields = ", ".join(f"{k}={v}" for k, v in LAB_FIELDS.items())
    lab = load_file(write(tmp_path, LAB.format(fields=fields), "29_pitfall_broken.py"), "whole_lab").LAB
    assert lab.cause == "forward-drop" and lab.prove is None and lab.lesson.number == "29"


@pytest.mark.parametrize("missing", sorted(LAB_FIELDS))
def test_a_lab_missing_a_field_fails_at_import_naming_file_and_field(tmp_path, missing):
    fields = ", ".join(f"{k}={v}" for k, v in LAB_FIELDS.items() if k != missing)
    import_fails(write(tmp_path, LAB.format(fields=fields), "29_pitfall_broken.py"), "lab 29", f"no {missing} ")


def test_a_lab_without_a_fix_skip_fails_at_import(tmp_path):
    fields = ", ".join(f"{k}={v}" for k, v in LAB_FIELDS.items())
    text = LAB.format(fields=fields).replace('skips={"fix": "stays broken"}', "skips={}")
    import_fails(write(tmp_path, text, "29_pitfall_broken.py"), "lab 29", '"fix" skip')


def test_run_as_a_script_the_broken_lesson_says_one_line_and_no_traceback(tmp_path):
    path = lesson(tmp_path, goal="")
    env = dict(os.environ, PYTHONPATH=STAGES)
    proc = subprocess.run([sys.executable, path, "--dry-run"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"{os.path.relpath(path, ROOT)}: lesson 99 has no goal "
                                                "(what the verification proves, in a sentence)"]


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(STAGES, "[0-9][0-9]*_*.py"))),
                         ids=os.path.basename)
def test_every_lesson_and_lab_keeps_the_contract(path):
    mod = load_file(path, "stage_" + os.path.basename(path)[:3])
    lab = getattr(mod, "LAB", None)
    lesson_ = lab.lesson if lab else mod.LESSON
    assert os.path.basename(path).startswith(lesson_.number + "_")
    assert (lesson_.kind == "lab") == bool(lab)


def test_each_run_makes_a_fresh_declared_state_and_hands_it_to_build_and_verify():
    from lesson import Lesson

    class Seen:
        def __init__(self):
            self.built = []

    L = Lesson("99", "state", goal="a goal", picture="a picture", state=Seen)
    handed = []

    def build(L, seen):
        seen.built.append("build")

    def verify(L, seen):
        handed.append(seen)

    L.start(quiet=True)
    first, second = L.play(build, verify), L.play(build, verify)
    assert handed == [first, second] and first is not second
    assert first.built == second.built == ["build"]


def test_a_state_that_is_no_class_fails_at_import(tmp_path):
    text = LESSON.replace('skips={skips!r})', 'skips={skips!r}, state={{}})')
    text = text.format(goal="g", picture="p", skips={"used": "it breaks"})
    import_fails(write(tmp_path, text), "state must be a class")


def test_a_variant_changes_declared_fields_on_a_copy_and_nothing_else():
    from lesson import ContractError, Lesson
    L = Lesson("99", "variant", goal="both halves", picture="a picture")
    half = L.variant(goal="one half", keep_hint="remove it with: this")
    assert (half.goal, half.keep_hint, half.picture) == ("one half", "remove it with: this", "a picture")
    assert L.goal == "both halves" and L.keep_hint != half.keep_hint
    with pytest.raises(ContractError):
        L.variant(number="98")
