"""What the driver tells its training workers: how many optimizer steps the run takes, and the rest of the
`WorkerPlan` every worker starts from."""

from dataclasses import dataclass

from core.errors import UserError


def make_plan(
    train_rows: int, workers: int, micro_batch: int, grad_accum: int, epochs: int, max_steps: int | None
) -> dict:
    """Optimizer steps per epoch and in total. Each step takes grad_accum global micro-batches of
    micro_batch x workers rows; the rows that cannot fill a whole step at the end of an epoch wait for the next
    epoch's order (fewer than one global batch)."""
    steps_per_epoch = train_rows // (micro_batch * workers) // grad_accum
    if steps_per_epoch == 0:
        raise UserError(
            f"data.train: {train_rows} training rows are too few for train.num_workers={workers} x "
            f"train.micro_batch_size={micro_batch} x train.grad_accum={grad_accum}; add data or lower them"
        )
    total = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    return {"steps_per_epoch": steps_per_epoch, "total_steps": total}


@dataclass(frozen=True)
class WorkerPlan:
    """The driver's plan for a run, the same for every worker (and every restart of them)."""

    steps_per_epoch: int
    total_steps: int
    packing: bool  # the rows are packed (the prepared data's setting when it is read from `zeray prep`)
    flops_per_token: float  # for the MFU figure
    deepspeed: dict | None  # the user's DeepSpeed file, checked against zeray's settings
    pad_token_id: int
    init_checkpoint: str | None = None  # under PBT: another trial's checkpoint a new run starts from
    eval_base: bool = True  # evaluate the model as loaded before the first step (a fresh start only)
