"""Wiring the chain and running generations: the ``pipe`` / ``sd`` / ``ar`` modes, stop conditions, the public
``Pipeline``."""

from .pipeline import Pipeline
from .request import Member, Request

__all__ = ["Pipeline", "Member", "Request"]
