from bionemo.distributed.env import DistEnv

__all__ = ["DistEnv"]
