"""The per-domain stages, so that a domain's failure says where it happened.

    stage = Stage("hospitality")
    stage("data"); ...; stage("adaptation")          # from here on, a failure is "adaptation: <error>"
    ...
    except Exception as err:
        raise stage.failed(err) from err      # StageFailed("adaptation: DataError: ...")

Stages, in order: data, adaptation, evaluation, compression, rescoring (best effort: a
warning, never a failure), registration, promotion, report.

Fault drills: METALOOP_INJECT_FAULT="<domain>:<stage>[:kill],..." makes entering that stage
raise `InjectedFault` (or SIGKILL the process) in the real flow, so tests and on-call drills
can prove that one domain's failure at any stage leaves the others registered and promoted.
`*` as the domain matches every domain. Unset (the default), it does nothing.
"""

from __future__ import annotations

import os
import signal

STAGES = ("data", "adaptation", "evaluation", "compression", "rescoring", "registration", "promotion", "report")
FAULT_ENV = "METALOOP_INJECT_FAULT"


class InjectedFault(RuntimeError):
    """Raised where METALOOP_INJECT_FAULT asks; never otherwise."""


class StageFailed(RuntimeError):
    """A domain's failure and the stage it happened in (message: '<stage>: <Type>: <error>')."""

    def __init__(self, stage: str, err: BaseException):
        super().__init__(f"{stage}: {type(err).__name__}: {err}")
        self.stage = stage


def inject(domain: str, stage: str) -> None:
    for item in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        target, _, rest = item.partition(":")
        where, _, how = rest.partition(":")
        if target in (domain, "*") and where == stage:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise InjectedFault(f"fault injected at {stage} of {domain} ({FAULT_ENV})")


class Stage:
    """The current stage of one domain's work."""

    def __init__(self, domain: str):
        self.domain, self.name = domain, "data"

    def __call__(self, name: str) -> None:
        assert name in STAGES, name
        self.name = name
        inject(self.domain, name)

    def failed(self, err: BaseException) -> StageFailed:
        return err if isinstance(err, StageFailed) else StageFailed(self.name, err)
