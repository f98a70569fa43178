"""Entry point of the training process: `python -m nf1prov.provenance.worker`, its `Spec` as
JSON on stdin (`nf1prov.provenance.training`). It trains in this process, or starts the
data-parallel ranks and waits for them (`ranks`), or is one of those ranks.

This module is what `nf1prov train` runs from the model commit's code, so its name stays.
"""

from __future__ import annotations

import sys

from nf1prov.provenance.training import (
    LOGGING_PENDING_EXIT,
    SPEC_VERSION,
    Spec,
    exit_code,
    is_rank,
    train_in_run,
    watch_parent,
)


def main() -> int:
    from nf1prov import process_spec
    from nf1prov.provenance import ranks, signals

    if is_rank():  # one of the processes `ranks.launch` started
        ranks.run_rank()
    spec = process_spec.read(Spec, SPEC_VERSION, "training")
    if spec is None:
        return 2
    watch_parent(spec.parent_pid)
    from nf1prov.train import distributed

    if distributed.environment_world()[1] > 1:  # `nf1prov train` ran under torchrun
        ranks.run_rank(spec)
    try:
        with signals.sigterm_as_exception():
            if spec.config["train"].get("nproc", 1) > 1:
                from nf1prov import outbox, tracking
                from nf1prov.provenance import run_end

                client = outbox.patiently(lambda: tracking.client(spec.tracking_uri),
                                          "opening the store")
                with run_end.run_guard(client, spec.run_id):  # what launch does not foresee
                    return ranks.launch(spec, client)
            if not train_in_run(spec):
                return LOGGING_PENDING_EXIT
    except (KeyboardInterrupt, signals.Interrupted, Exception) as exc:  # noqa: BLE001
        return exit_code(exc)  # the run says why; the parent reports it
    return 0



if __name__ == "__main__":
    sys.exit(main())
