"""nlcompile: exact chunkwise compilation of per-token fast-weight update loops.

    import nlcompile
    fast = nlcompile.compile(model)          # same call signature, same outputs
    print(nlcompile.explain(model, *inputs)) # what was found and chosen
"""
from nlcompile.api import CompiledFunction, compile, explain
from nlcompile.ir import RuleKind
from nlcompile.report import LoopReport, Report
from nlcompile.targets.registry import Target, list_targets, register_target

__all__ = ["compile", "explain", "CompiledFunction", "Report", "LoopReport", "RuleKind",
           "register_target", "list_targets", "Target"]
__version__ = "0.1.0"
