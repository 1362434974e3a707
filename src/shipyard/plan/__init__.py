"""The plan layer: pure decisions, no I/O. Given the desired stack and the recorded world it
returns what should happen; the engine carries it out."""

from shipyard.plan.diff import Change, diff_stack, spec_hash
from shipyard.plan.graph import DependencyGraph
from shipyard.plan.restart import RestartDecision, decide_restart
from shipyard.plan.schedule import DeployScheduler, Milestone, simulate

__all__ = [
    "Change",
    "DependencyGraph",
    "DeployScheduler",
    "Milestone",
    "RestartDecision",
    "decide_restart",
    "diff_stack",
    "simulate",
    "spec_hash",
]
