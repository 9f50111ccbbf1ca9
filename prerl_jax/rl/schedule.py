"""Phase schedules: which Objective trains at each step, and what resets when a phase begins.

Steps are counted from 1. A phase is active from the step its predecessor ends on, up to but not
including its own `until_step`; the last phase runs forever (until_step=None). DSRL is the
two-phase schedule nsr_prerl (steps 1 .. S-1), then grpo (from step S on).
`schedule_from_config` reads the schedule of a run config's `objective` section.
"""

import dataclasses
from collections.abc import Mapping

from prerl_jax.errors import UserError
from prerl_jax.rl import objective as objective_config
from prerl_jax.rl.objective import Objective


@dataclasses.dataclass(frozen=True)
class Phase:
  """An objective, the step it stops before, and what to reset on entering it.

  reset_optimizer: start this phase with fresh optimizer state (moments and step count).
  reset_reference: make the current parameters the KL reference policy ("Policy Reincarnation").
  The flags of the first phase have no effect: nothing precedes it.
  """

  objective: Objective
  until_step: int | None = None
  reset_optimizer: bool = False
  reset_reference: bool = False


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Consecutive phases; only the last may, and must, have until_step=None."""

  phases: tuple[Phase, ...]

  def __post_init__(self):
    if not self.phases:
      raise ValueError("a Schedule needs at least one phase")
    if self.phases[-1].until_step is not None:
      raise ValueError(f"the last phase ({self.phases[-1].objective.name!r}) must have "
                       f"until_step=None, got {self.phases[-1].until_step}")
    previous = 1
    for phase in self.phases[:-1]:
      if phase.until_step is None or phase.until_step <= previous:
        raise ValueError(f"phase {phase.objective.name!r}: until_step={phase.until_step} must be "
                         f"an int > {previous} (steps start at 1 and phases may not be empty)")
      previous = phase.until_step

  def _index(self, step: int) -> int:
    if step < 1:
      raise ValueError(f"step={step}: steps are counted from 1")
    for i, phase in enumerate(self.phases[:-1]):
      if step < phase.until_step:
        return i
    return len(self.phases) - 1

  def phase_at(self, step: int) -> Phase:
    """The phase active at `step`."""
    return self.phases[self._index(step)]

  def objective_at(self, step: int) -> Objective:
    """The objective trained at `step`."""
    return self.phase_at(step).objective

  def is_switch(self, step: int) -> bool:
    """True when `step` is the first step of a phase other than the first."""
    index = self._index(step)
    return index > 0 and step == self.phases[index - 1].until_step


# The keys a run config's DSRL objective section adds to the Objective fields of its main phase.
DSRL_KEYS = ("warmup", "switch_step", "reset_optimizer", "reset_reference")


def dsrl_schedule(switch_step: int = 20, reset_optimizer: bool = False,
                  reset_reference: bool = True, warmup: Objective | None = None,
                  main: Objective | None = None) -> Schedule:
  """DSRL: `warmup` (NSR-PreRL) while step < switch_step, `main` (GRPO) from switch_step on."""
  if not isinstance(switch_step, int) or switch_step < 2:
    raise UserError(f"switch_step={switch_step!r} must be an int >= 2 (steps start at 1)")
  return Schedule((
      Phase(warmup or objective_config.get_objective("nsr_prerl"), until_step=switch_step),
      Phase(main or objective_config.get_objective("grpo"), reset_optimizer=reset_optimizer,
            reset_reference=reset_reference),
  ))


SCHEDULES = tuple(sorted(objective_config.PRESETS)) + ("dsrl",)


def get_schedule(name: str, **kwargs) -> Schedule:
  """'dsrl' (kwargs: dsrl_schedule's), or a preset objective for every step (kwargs: overrides)."""
  if name == "dsrl":
    valid = DSRL_KEYS[1:]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
      raise ValueError(f"unknown dsrl option(s) {unknown}; valid options: {list(valid)}")
    return dsrl_schedule(**kwargs)
  if name not in objective_config.PRESETS:
    raise ValueError(f"unknown schedule {name!r}; valid names: {list(SCHEDULES)}")
  return Schedule((Phase(objective_config.get_objective(name, **kwargs)),))


def objective_from_config(fields: Mapping, section: str = "objective") -> Objective:
  """The Objective a config section of its fields describes; errors name `section.<key>`."""
  valid = [field.name for field in dataclasses.fields(Objective)]
  unknown = [f"{section}.{key}" for key in fields if key not in valid]
  if unknown:
    raise UserError(f"unknown config key(s) {unknown}; valid: {valid}")
  try:
    return Objective(**fields)
  except (TypeError, ValueError) as error:
    raise UserError(f"config section {section}: {error}") from None


def schedule_from_config(section: Mapping) -> Schedule:
  """The schedule of a run config's `objective` section.

  The section holds Objective fields: one objective for every step. DSRL's adds `warmup` (the
  fields of the phase before the switch), `switch_step`, `reset_optimizer` and `reset_reference`;
  its own fields are then the objective from switch_step on.
  """
  fields = dict(section)
  if "warmup" not in fields:
    return Schedule((Phase(objective_from_config(fields)),))
  switch = {key: fields.pop(key, None) for key in DSRL_KEYS}
  missing = [f"objective.{key}" for key, value in switch.items() if value is None]
  if missing:
    raise UserError(f"config key(s) {missing} missing beside objective.warmup")
  return dsrl_schedule(switch["switch_step"], switch["reset_optimizer"],
                       switch["reset_reference"],
                       warmup=objective_from_config(switch["warmup"], "objective.warmup"),
                       main=objective_from_config(fields))
