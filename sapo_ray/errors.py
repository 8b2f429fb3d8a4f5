"""The error that ends a run on purpose, with a message saying why and what to do."""


class StopRun(RuntimeError):
    """The run cannot usefully go on: the reward fails for most samples step after step
    (`reward.max_error_rate`), every optimizer step is skipped (`trainer.max_skipped_steps`), actors keep
    dying (`trainer.max_actor_restarts`), or a checkpoint cannot be saved."""
