"""The process state machine driven as pure functions: validation and transitions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from app.processes import engine
from app.processes.definition import Definition

EXAMPLE = Path(__file__).resolve().parents[2] / "app" / "processes" / "examples" / "predictive_maintenance.json"
ROLES = ("operator", "engineer", "technologist")
FIRING = {"vibration_mm_s": 9.1, "bearing_temp_c": 95}
LIMITS = {"vibration_limit": 7, "temperature_limit": 80}


def example() -> Definition:
    return Definition.model_validate(json.loads(EXAMPLE.read_text())["definition"])


def context(state: dict[str, Any]) -> engine.Context:
    return engine.Context(instance_id="i-1", device_id="dev-1", state=state)


def kinds(plan: engine.Plan) -> list[tuple[str, str]]:
    return [(type(e).__name__, getattr(e, "step", getattr(e, "result", ""))) for e in plan.effects]


def test_the_example_is_valid() -> None:
    assert engine.problems("predictive-maintenance", example(), ROLES, []) == []


def test_criteria_fire_mail_the_operator_and_wait_for_the_review() -> None:
    plan = engine.start(example(), context(FIRING), {"input": LIMITS})
    assert kinds(plan) == [
        ("Passed", "criteria"),
        ("Send", "tell_operator"),
        ("Passed", "tell_operator"),
        ("Open", "operator_review"),
    ]
    send = plan.effects[1]
    assert isinstance(send, engine.Send)
    assert send.to == ("operator@plant.example",)
    assert send.subject == "Device dev-1: a defect is predicted"
    assert "9.1 mm/s" in send.body
    opened = plan.effects[3]
    assert isinstance(opened, engine.Open)
    assert (opened.role, opened.due_in_s) == ("operator", 86400)
    assert plan.data["steps"]["criteria"] == {"outcome": "fired"}


def test_quiet_criteria_end_at_once() -> None:
    plan = engine.start(example(), context({"vibration_mm_s": 9.1}), {"input": LIMITS})
    assert plan.finished == engine.Finish("no_defect")


def test_confirmed_opens_the_repair_in_parallel_and_the_join_waits_for_both() -> None:
    definition = example()
    started = engine.start(definition, context(FIRING), {"input": LIMITS})
    plan = engine.complete(definition, context(FIRING), started.data, "operator_review", "confirmed")
    opened = [e for e in plan.effects if isinstance(e, engine.Open)]
    assert [o.step for o in opened] == ["technologist_repair", "repair_task"]
    assert opened[1].task == engine.TaskSpec("repair", {"reason": "predicted defect", "vibration_mm_s": 9.1}, 300, None)
    first = engine.complete(definition, context(FIRING), plan.data, "repair_task", "succeeded", {"result": {"ok": 1}})
    assert kinds(first)[-1] == ("Arrived", "repaired")
    assert first.finished is None
    second = engine.complete(
        definition, context(FIRING), first.data, "technologist_repair", "done", joins={"repaired": 1}
    )
    assert second.finished == engine.Finish("repaired")
    assert second.data["steps"]["repair_task"] == {"result": {"ok": 1}, "outcome": "succeeded"}


def test_rejected_goes_to_the_engineer() -> None:
    definition = example()
    started = engine.start(definition, context(FIRING), {"input": LIMITS})
    plan = engine.complete(definition, context(FIRING), started.data, "operator_review", "rejected")
    sends = [e for e in plan.effects if isinstance(e, engine.Send)]
    assert [s.to for s in sends] == [("engineer@plant.example",)]
    assert [e.step for e in plan.effects if isinstance(e, engine.Open)] == ["engineer_review"]


def _definition(steps: dict[str, Any], **extra: Any) -> Definition:
    return Definition.model_validate({"start": next(iter(steps)), "steps": steps, **extra})


def test_every_problem_is_listed() -> None:
    definition = _definition(
        {
            "ask": {"kind": "human", "role": "pilot", "outcomes": ["yes", "no"], "next": {"yes": "end", "maybe": "x"}},
            "loop": {"kind": "timer", "wait_s": 1, "next": {"done": "loop"}},
            "check": {
                "kind": "decision",
                "conditions": [{"when": "state.x >", "outcome": "a"}],
                "otherwise": "b",
                "next": {"a": "end", "b": "end"},
            },
            "call": {"kind": "subprocess", "definition": "nobody", "next": {"*": "end"}},
            "mail": {"kind": "notify", "channel": "email", "to": ["@nobody"], "next": {"done": "end"}},
            "end": {"kind": "end"},
        }
    )
    found = engine.problems("p", definition, ROLES, [])
    expected = [
        "step 'ask': outcome 'no' leads nowhere",
        "step 'ask': `next` names outcome 'maybe'",
        "step 'ask': outcome 'maybe' leads to unknown step 'x'",
        "step 'ask': unknown role 'pilot'",
        "step 'check': 'state.x >' is not a valid CEL expression",
        "step 'call': unknown process definition 'nobody'",
        "step 'mail': unknown recipient group '@nobody'",
        "step 'loop': unreachable from the start",
        "step 'check': unreachable from the start",
    ]
    for text in expected:
        assert any(problem.startswith(text) for problem in found), (text, found)


def test_a_cycle_without_a_way_out_is_refused() -> None:
    definition = _definition(
        {
            "a": {
                "kind": "human",
                "role": "operator",
                "outcomes": ["again", "stop"],
                "next": {"again": "b", "stop": "z"},
            },
            "b": {"kind": "timer", "wait_s": 5, "next": {"done": "c"}},
            "c": {"kind": "timer", "wait_s": 5, "next": {"done": "b"}},
            "z": {"kind": "end"},
        }
    )
    found = engine.problems("p", definition, ROLES, [])
    assert sorted(found) == [
        "step 'b': no way out (no path from it reaches an end step)",
        "step 'c': no way out (no path from it reaches an end step)",
    ]


def test_a_loop_of_automatic_steps_fails_the_instance() -> None:
    definition = _definition(
        {
            "d": {
                "kind": "decision",
                "conditions": [{"when": "true", "outcome": "again"}],
                "otherwise": "out",
                "next": {"again": "e", "out": "z"},
            },
            "e": {"kind": "notify", "channel": "webhook", "url": "http://hook.example/x", "next": {"done": "d"}},
            "z": {"kind": "end"},
        }
    )
    assert engine.problems("p", definition, ROLES, []) == []
    plan = engine.start(definition, context({}), {"input": {}})
    assert plan.finished is not None
    assert plan.finished.result == "failed"
    assert "loop" in (plan.finished.reason or "")


def test_any_join_passes_on_the_first_path_and_cancels_the_rest() -> None:
    definition = _definition(
        {
            "split": {"kind": "parallel", "branches": ["a", "b"]},
            "a": {"kind": "human", "role": "operator", "next": {"done": "j"}},
            "b": {"kind": "human", "role": "engineer", "next": {"done": "j"}},
            "j": {"kind": "join", "wait_for": "any", "next": {"done": "z"}},
            "z": {"kind": "end"},
        }
    )
    assert engine.problems("p", definition, ROLES, []) == []
    started = engine.start(definition, context({}), {"input": {}})
    assert [e.step for e in started.effects if isinstance(e, engine.Open)] == ["a", "b"]
    plan = engine.complete(definition, context({}), started.data, "b", "done")
    assert engine.CancelOpen(frozenset({"split", "a", "b"})) in plan.effects
    assert plan.finished == engine.Finish("completed")


def test_an_outcome_without_a_next_at_run_time_fails_the_instance() -> None:
    definition = _definition(
        {
            "call": {
                "kind": "subprocess",
                "definition": "child",
                "next": {"completed": "z", "failed": "z", "canceled": "z"},
            },
            "z": {"kind": "end"},
        }
    )
    plan = engine.complete(definition, context({}), {"input": {}, "steps": {}}, "call", "exploded")
    assert plan.finished is not None
    assert plan.finished.result == "failed"


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("${input.n}", 3),
        ("n=${input.n}, missing=${input.nope}", "n=3, missing="),
        ({"list": ["${state.t}", "x"]}, {"list": [[1, 2], "x"]}),
    ],
)
def test_templates(template: Any, expected: Any) -> None:
    assert engine.render(template, {"input": {"n": 3}, "state": {"t": [1, 2]}}) == expected
