"""ckptkeeperd: the keeper daemon, the one-shot sweep and the command line of ckptkeeper."""

__all__: list[str] = []
