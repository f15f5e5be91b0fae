"""Controllers: the systems compared over the same simulator (see :mod:`nitsum_opt.sim.controllers.registry`)."""

from nitsum_opt.sim.controllers.base import ControlContext, Controller, StaticController

__all__ = ["ControlContext", "Controller", "StaticController"]
