"""The plan: the list of steps one conversion runs, made from the options and the source kind
before anything is loaded, so the progress total is the plan's length.

    load model → reference outputs → [prepare: prune | distil (, train alone)] → convert each
    recipe (or measure the .tflite as is) → measure latency → select → [pruning | distillation
    report] → analyse ops → [Edge TPU] → package

A step is a label (text, or a function of the state for labels known only when the step starts)
and a function of the :class:`~converter.state.Conversion`. A new step is one entry in
:func:`build_plan`; its module holds the work.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Union

from . import candidates, load, measure, package, prepare, select
from .state import Conversion

__all__ = ["Step", "build_plan", "run_plan"]

Label = Union[str, Callable[[Conversion], str]]


@dataclass(frozen=True)
class Step:
    label: Label
    run: Callable[[Conversion], None]

    def describe(self, c: Conversion) -> str:
        return self.label if isinstance(self.label, str) else self.label(c)


def build_plan(c: Conversion) -> list[Step]:
    """The steps for this conversion, in order."""
    o = c.options
    steps = [Step("load model", load.load_model_and_data), Step("reference outputs", load.reference_outputs)]
    if o.prune:
        steps.append(Step(prepare.prune_label, prepare.prune))
    if o.distill_into is not None:
        steps.append(Step(prepare.distill_label, prepare.distill))
        if o.compare_alone:
            steps.append(Step(prepare.alone_label, prepare.train_alone))
    if not c.kind.convertible:
        steps.append(Step("measure the .tflite as is", candidates.measure_as_is))
    steps += [Step(f"convert {r.label}", partial(candidates.convert_recipe, recipe=r)) for r in c.to_convert]
    steps += [Step("measure latency", measure.measure_latencies), Step("select a recipe", select.select)]
    if o.prune:
        steps.append(Step(prepare.pruning_report_label, prepare.pruning_report))
    if o.distill_into is not None:
        steps.append(Step(prepare.distillation_report_label, prepare.distillation_report))
    steps.append(Step("analyse ops", package.analyse_ops))
    if o.target == "edgetpu":
        steps.append(Step("compile for the Edge TPU", package.compile_edgetpu))
    steps.append(Step("golden outputs and bundle", package.golden_and_bundle))
    return steps


def run_plan(steps: list[Step], c: Conversion, progress: Optional[Callable[[str, int, int], None]]) -> None:
    """Run ``steps`` in order, telling ``progress(label, done, total)`` before each and at the end."""
    total = len(steps)
    for done, step in enumerate(steps):
        if progress:
            progress(step.describe(c), done, total)
        step.run(c)
    if progress:
        progress("done", total, total)
