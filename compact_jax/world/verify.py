"""Checks that a question needs exactly its listed capabilities.

Each capability reads a set of scene *features* (`FEATURES`): colour reads every
object's colour, spatial_relationship reads the left/right and above/below order
of every pair, scene_understanding reads the ground under every object and the
picture's ground, and so on. counting reads none: it is only ever a query.

`verify_question` runs three checks and lists every failure with its reason:

1. Necessity (per listed capability). The query's capability is necessary by
   construction (checked by 3b). Every other listed capability c is necessary iff
   dropping all constraints that carry c changes the charitable answer set (see
   `questions.answer_set`): either another answer becomes possible or none is. This
   is what rejects the calibration note's shortcut: in "the colour of the object
   left of the triangle" with one object left of anything, dropping the shape
   leaves "the object left of some object", whose only reading gives the same
   colour. Minimality is checked the same way per single constraint, so no
   constraint is decoration.
2. No unlisted capability (Monte Carlo). Scenes are resampled so that every
   feature of every listed capability stays fixed while the features of all
   unlisted ones change together; the question must stay well posed with the same
   answer (after a failure, each capability is perturbed alone to name it). One changed answer proves an unlisted capability is
   needed; passing is evidence, not proof. Capabilities whose features are fully
   determined by the listed ones (e.g. no way to change regions while keeping every
   pairwise order) simply yield no perturbation.
3. Not predictable from the text. (a) The answer does not occur as words in the
   question. (b) Some edit of the scene keeps the question well posed but changes
   the answer, so the text alone does not fix it. The search tries every single
   edit of the objects the question refers to (`_single_edits`), then random ones.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from compact_jax import capabilities as caps_lib
from compact_jax.world import questions as q_lib
from compact_jax.world import scene as scene_lib
from compact_jax.world.rand import Rand

Scene = scene_lib.Scene


def _pair_order(scene: Scene) -> tuple:
  objs = scene.objects
  return tuple(
    ((a.col > b.col) - (a.col < b.col), (a.row > b.row) - (a.row < b.row))
    for a in objs
    for b in objs
  )


FEATURES: dict[str, Callable[[Scene], tuple]] = {
  "color": lambda s: tuple(o.color for o in s.objects),
  "shape": lambda s: tuple(o.kind if o.is_shape else None for o in s.objects),
  "object_recognition": lambda s: tuple(o.kind if not o.is_shape else None for o in s.objects),
  "text_recognition": lambda s: tuple(o.letter for o in s.objects),
  "action_recognition": lambda s: tuple(o.motion for o in s.objects),
  "spatial_recognition": lambda s: tuple(s.region(i) for i in range(len(s.objects))),
  "spatial_relationship": _pair_order,
  "object_interaction": lambda s: tuple(sorted(s.links)),
  "scene_understanding": lambda s: (
    s.place,
    tuple(s.object_ground(i) for i in range(len(s.objects))),
  ),
  "counting": lambda s: (len(s.objects),),
}
POSITION_CAPS = ("spatial_recognition", "spatial_relationship")


# --- resampling one capability's features ---------------------------------------
# Perturbed scenes keep object indices (so features compare index by index) and
# may leave objects unsorted; they are never rendered or saved.


def _pick(n: int, only: Sequence[int] | None) -> Sequence[int]:
  return range(n) if only is None else only


_new = object.__new__


def _with(o: scene_lib.WorldObject, **changes) -> scene_lib.WorldObject:
  # dataclasses.replace costs ~8 us and a frozen dataclass's __init__ (one object.__setattr__
  # per field) ~2 us; perturbations make tens of thousands of copies. WorldObject has no
  # __post_init__, so filling __dict__ directly builds the same object.
  new = _new(scene_lib.WorldObject)
  new.__dict__.update(o.__dict__)
  new.__dict__.update(changes)
  return new


def _with_objects(scene: Scene, objects) -> Scene:
  # As in `_with`; only the fields are copied (a scene's memo belongs to its objects).
  new = _new(Scene)
  d = new.__dict__
  d["grid_size"], d["ground"], d["objects"] = scene.grid_size, scene.ground, tuple(objects)
  d["links"], d["patch"], d["patch_ground"] = scene.links, scene.patch, scene.patch_ground
  return new


def _scene_with(scene: Scene, **changes) -> Scene:
  """``dataclasses.replace(scene, **changes)``, built as in `_with_objects`."""
  new = _with_objects(scene, scene.objects)
  new.__dict__.update(changes)
  return new


def _resample_attr(attr: str, choices: Sequence, applies=lambda o: True):
  def fn(scene: Scene, rng: Rand, only: Sequence[int] | None, keep: frozenset) -> Scene:
    del keep
    objs = list(scene.objects)
    for i in _pick(len(objs), only):
      if applies(objs[i]):
        objs[i] = _with(objs[i], **{attr: rng.choice(choices)})
    return _with_objects(scene, objs)

  return fn


# Capabilities that read one field of each object: (field, values, applies to).
_OBJECT_ATTRIBUTES: dict[str, tuple[str, Sequence, Callable]] = {}


def _resample_attributes(scene: Scene, attrs, rng: Rand, only: Sequence[int] | None) -> Scene:
  """All of ``attrs`` resampled at once, one copy per object (perturb's hot path)."""
  objs = list(scene.objects)
  rand = rng.random
  for i in _pick(len(objs), only):
    o = objs[i]
    fields = None
    for field, values, applies in attrs:
      if applies(o):
        if fields is None:
          fields = dict(o.__dict__)
        fields[field] = values[int(rand() * len(values))]  # = rng.choice(values)
    if fields is not None:
      new = objs[i] = _new(scene_lib.WorldObject)
      new.__dict__.update(fields)
  return _with_objects(scene, objs)


def _resample_ground(scene: Scene, rng: Rand, only: Sequence[int] | None, keep) -> Scene:
  del only, keep
  return _scene_with(scene, **scene_lib.sample_ground(rng, scene.grid_size))


def _resample_links(scene: Scene, rng: Rand, only: Sequence[int] | None, keep) -> Scene:
  """New random ropes; with ``only``, toggles one rope at the first of those objects."""
  del keep
  n = len(scene.objects)
  if only is not None and n > 1:
    a = only[0]
    b = rng.choice([j for j in (*only[1:], *range(n)) if j != a])
    pair = (min(a, b), max(a, b))
    links = set(scene.links) ^ {pair}
    return _scene_with(scene, links=tuple(sorted(links)))
  pairs = list(_pairs(n))
  rng.shuffle(pairs)
  links = pairs[: rng.integers(0, min(len(pairs), 2) + 1)]
  return _scene_with(scene, links=tuple(sorted(links)))


@functools.lru_cache(maxsize=64)
def _pairs(n: int) -> tuple[tuple[int, int], ...]:
  return tuple((i, j) for i in range(n) for j in range(i + 1, n))


def _move_objects(scene: Scene, rng: Rand, only: Sequence[int] | None, keep) -> Scene:
  """New cells for the objects, preserving whichever position features are kept.

  Keeping pairwise order: cells come from strictly increasing maps of the used rows
  and columns (the regions and grounds this gives are checked by `perturb`).
  Otherwise each object moves to a free cell in its own region and on its own
  ground when those are kept.
  """
  g = scene.grid_size
  objs = scene.objects
  if "spatial_relationship" in keep:
    rows = sorted({o.row for o in objs})
    cols = sorted({o.col for o in objs})
    new_r = dict(zip(rows, sorted(rng.sample(range(g), len(rows)))))
    new_c = dict(zip(cols, sorted(rng.sample(range(g), len(cols)))))
    cells = [(new_r[o.row], new_c[o.col]) for o in objs]
  else:
    ids = _pick(len(objs), only)
    taken = {(o.row, o.col) for k, o in enumerate(objs) if k not in ids}
    cells = [(o.row, o.col) for o in objs]
    keep_region, keep_ground = "spatial_recognition" in keep, "scene_understanding" in keep
    layout = (g, scene.ground, scene.patch, scene.patch_ground)
    rand = rng.random
    for i in ids:
      region = scene.region(i) if keep_region else None
      ground = scene.object_ground(i) if keep_ground else None
      free = [cell for cell in _cells(layout, region, ground) if cell not in taken]
      if not free:
        return scene
      cells[i] = free[int(rand() * len(free))]  # = rng.choice(free)
      taken.add(cells[i])
  return _with_objects(scene, (_with(o, row=r, col=c) for o, (r, c) in zip(objs, cells)))


@functools.lru_cache(maxsize=4096)
def _cells(layout: tuple, region: str | None, ground: str | None) -> tuple[tuple[int, int], ...]:
  """The cells, row-major, in ``region`` and on ``ground`` (None: any) of a ground
  ``layout`` (grid_size, ground, patch, patch_ground)."""
  g, base, patch, patch_ground = layout
  at = Scene(g, base, (), (), patch, patch_ground).ground_at
  return tuple(
    (r, c)
    for r in range(g)
    for c in range(g)
    if (region is None or scene_lib.region_name(r, c, g) == region)
    and (ground is None or at(r, c) == ground)
  )


def _add_or_remove_object(scene: Scene, rng: Rand, only: Sequence[int] | None, keep) -> Scene:
  del only, keep
  g, objs = scene.grid_size, list(scene.objects)
  if objs and (rng.random() < 0.5 or len(objs) == g * g):
    return _without_object(scene, rng.integers(len(objs)))
  taken = {(o.row, o.col) for o in objs}
  free = [(r, c) for r in range(g) for c in range(g) if (r, c) not in taken]
  r, c = rng.choice(free)
  pool = scene_lib.KINDS if rng.random() < 0.5 else [o.kind for o in objs] or scene_lib.KINDS
  colors = (
    list(scene_lib.COLORS)
    if rng.random() < 0.5
    else [o.color for o in objs] or list(scene_lib.COLORS)
  )
  new = scene_lib.WorldObject(
    row=r,
    col=c,
    color=rng.choice(colors),
    kind=rng.choice(pool),
    letter=rng.choice(scene_lib.LETTERS) if rng.random() < 0.5 else None,
    motion=rng.choice(scene_lib.DIRECTIONS) if rng.random() < 0.5 else None,
  )
  return _scene_with(scene, objects=(*objs, new))


def _without_object(scene: Scene, k: int) -> Scene:
  objs = scene.objects[:k] + scene.objects[k + 1 :]
  links = tuple((a - (a > k), b - (b > k)) for a, b in scene.links if k not in (a, b))
  return _scene_with(scene, objects=objs, links=links)


_NONE_OR_LETTER = [None, *scene_lib.LETTERS]
_NONE_OR_DIRECTION = [None, *scene_lib.DIRECTIONS]

_OBJECT_ATTRIBUTES.update(
  color=("color", tuple(scene_lib.COLORS), lambda o: True),
  shape=("kind", scene_lib.SHAPES, lambda o: o.is_shape),
  object_recognition=("kind", scene_lib.SPRITES, lambda o: not o.is_shape),
  text_recognition=("letter", _NONE_OR_LETTER, lambda o: True),
  action_recognition=("motion", _NONE_OR_DIRECTION, lambda o: True),
)

RESAMPLERS: dict[str, Callable[..., Scene]] = {
  "color": _resample_attr("color", tuple(scene_lib.COLORS)),
  "shape": _resample_attr("kind", scene_lib.SHAPES, lambda o: o.is_shape),
  "object_recognition": _resample_attr("kind", scene_lib.SPRITES, lambda o: not o.is_shape),
  "text_recognition": _resample_attr("letter", _NONE_OR_LETTER),
  "action_recognition": _resample_attr("motion", _NONE_OR_DIRECTION),
  "spatial_recognition": _move_objects,
  "spatial_relationship": _move_objects,
  "object_interaction": _resample_links,
  "scene_understanding": _resample_ground,
  "counting": _add_or_remove_object,
}


def perturb(
  scene: Scene,
  change: Iterable[str],
  keep: Iterable[str],
  rng: Rand,
  *,
  only: Sequence[int] | None = None,
  tries: int = 8,
) -> Scene | None:
  """Resamples the features of ``change`` while every feature of ``keep`` stays fixed.

  Returns None if no such scene turned up in ``tries`` proposals, or if the only
  ones found did not change anything.
  """
  keep = frozenset(keep)
  change = [c for c in change if c not in keep]
  if not change or not scene.objects:
    return None
  # The unperturbed scene is perturbed many times (and is often a pool scene, asked
  # about again and again): its features are kept on it.
  want = {c: scene.memo("feature:" + c, FEATURES[c]) for c in keep}
  attrs = [_OBJECT_ATTRIBUTES[c] for c in change if c in _OBJECT_ATTRIBUTES]
  others = [c for c in change if c not in _OBJECT_ATTRIBUTES]
  if "spatial_recognition" in others and "spatial_relationship" in others:
    others.remove("spatial_relationship")  # one move resamples both
  for _ in range(tries):
    s = _resample_attributes(scene, attrs, rng, only) if attrs else scene
    for c in others:
      s = RESAMPLERS[c](s, rng, only, keep)
    if s != scene and all(FEATURES[c](s) == v for c, v in want.items()):
      return s
  return None


# --- the three checks -------------------------------------------------------------


@dataclasses.dataclass
class VerificationReport:
  """What `verify_question` found; ``failures`` holds one reason per failed check."""

  answer: str | None
  text: str
  necessary: dict[str, bool]
  superfluous: list[str]
  failures: list[str]

  @property
  def ok(self) -> bool:
    return not self.failures


def necessity(scene: Scene, program: q_lib.Program, answer: str) -> dict[str, bool]:
  """For each capability of the program: is it needed to get ``answer`` (check 1)?"""
  out = {}
  query_cap = q_lib.QUERY_CAPABILITY[program.query]
  for cap in sorted(program.capabilities):
    if cap == query_cap:
      out[cap] = True
      continue
    out[cap] = q_lib.answer_set_without(program, scene, capability=cap) != {answer}
  return out


def superfluous_constraints(scene: Scene, program: q_lib.Program, answer: str) -> list[str]:
  """Constraints whose removal leaves the answer unambiguous and unchanged."""
  out = []
  for idx, (f, r) in enumerate(q_lib.iter_constraints(program)):
    if q_lib.answer_set_without(program, scene, index=idx) == {answer}:
      out.append(q_lib.describe_constraint(f, r))
  return out


def exact_answer(scene: Scene, program: q_lib.Program, listed: frozenset[str]) -> str | None:
  """The answer if ``program`` passes the exact checks of `verify_question` for the
  capabilities ``listed`` (well posed, exactly the listed capabilities, check 1 with
  minimality, 3a), else None: ``verify_question(..., quick=True)`` reduced to its
  verdict, stopping at the first failure. The question search screens every proposal
  with it; the checks draw nothing at random, so the search's draws are unchanged."""
  answer, _ = q_lib.resolve(program, scene)
  if answer is None:
    return None
  caps = program.capabilities
  if caps != listed:
    return None
  want = {answer}
  query_cap = q_lib.QUERY_CAPABILITY[program.query]
  for cap in caps:
    if cap != query_cap and q_lib.answer_set_without(program, scene, capability=cap) == want:
      return None
  for idx in range(q_lib.constraint_count(program)):
    if q_lib.answer_set_without(program, scene, index=idx) == want:
      return None
  if answer_in_text(q_lib.question_text(program), answer):
    return None
  return answer


def unlisted_changes(
  scene: Scene,
  program: q_lib.Program,
  listed: Iterable[str],
  rng: Rand,
  *,
  num_joint: int = 3,
) -> list[str]:
  """Perturbations of unlisted capabilities that changed the answer (check 2).

  Perturbs all unlisted capabilities together ``num_joint`` times; only after a
  change does it perturb them one at a time, to name the capability responsible.
  """
  listed = frozenset(listed)
  answer, _ = q_lib.resolve(program, scene)
  unlisted = [c for c in caps_lib.CAPABILITIES if c not in listed and c != "counting"]

  def changed(change) -> str | None:
    s = perturb(scene, change, listed, rng)
    if s is None:
      return None
    got, why = q_lib.resolve(program, s)
    return None if got == answer else f"{got!r}{' (' + why + ')' if why else ''}"

  for _ in range(num_joint):
    got = changed(unlisted)
    if got is None:
      continue
    culprits = [c for c in unlisted for _ in range(4) if changed([c]) is not None]
    names = "+".join(dict.fromkeys(culprits)) or "capabilities (jointly)"
    return [f"perturbing unlisted {names} changed the answer {answer!r} -> {got}"]
  return []


def answer_in_text(text: str, answer: str) -> bool:
  words = text.lower().rstrip("?").replace(",", " ").split()
  ans = answer.lower().split()
  return any(words[i : i + len(ans)] == ans for i in range(len(words) - len(ans) + 1))


def _referenced_objects(scene: Scene, program: q_lib.Program) -> list[int]:
  """The objects a well-posed program's descriptions pick out (subject first)."""
  out = []
  for d in (program.subject, program.other):
    if d is not None:
      for ids in q_lib.chain_objects(d, scene):
        out.extend(sorted(ids))
  return list(dict.fromkeys(out))


def _single_edits(scene: Scene, program: q_lib.Program) -> Iterator[Scene]:
  """Every one-step edit of what the question's capabilities read, in a fixed order.

  For each object the question refers to: each other value of each listed
  attribute, each free cell (position capabilities), toggling a rope to each other
  object, a copy in each free cell (counting); then each other ground, and removing
  each object (counting).
  """
  caps = program.capabilities
  objs, g = scene.objects, scene.grid_size
  taken = {(o.row, o.col) for o in objs}
  free = [(r, c) for r in range(g) for c in range(g) if (r, c) not in taken]
  positional = caps & {"spatial_recognition", "spatial_relationship", "scene_understanding"}

  def edited(i, **changes):
    return _with_objects(scene, (*objs[:i], _with(objs[i], **changes), *objs[i + 1 :]))

  for i in _referenced_objects(scene, program) or range(len(objs)):
    o = objs[i]
    values = {
      "color": ("color", tuple(scene_lib.COLORS)),
      "shape": ("kind", scene_lib.SHAPES if o.is_shape else ()),
      "object_recognition": ("kind", () if o.is_shape else scene_lib.SPRITES),
      "text_recognition": ("letter", _NONE_OR_LETTER),
      "action_recognition": ("motion", _NONE_OR_DIRECTION),
    }
    for cap, (attr, options) in values.items():
      if cap in caps:
        yield from (edited(i, **{attr: v}) for v in options if v != getattr(o, attr))
    if positional:
      yield from (edited(i, row=r, col=c) for r, c in free)
    if "object_interaction" in caps:
      for j in range(len(objs)):
        if j != i:
          pair = (min(i, j), max(i, j))
          yield _scene_with(scene, links=tuple(sorted(set(scene.links) ^ {pair})))
    if "counting" in caps:
      yield from (_with_objects(scene, (*objs, _with(o, row=r, col=c))) for r, c in free)
  if "scene_understanding" in caps:
    for ground in scene_lib.GROUNDS:
      if ground not in (scene.ground, scene.patch_ground):
        yield _scene_with(scene, ground=ground)
        if scene.patch is not None:
          yield _scene_with(scene, patch_ground=ground)
  if "counting" in caps:
    yield from (_without_object(scene, k) for k in range(len(objs)))


def find_counterfactual(
  scene: Scene, program: q_lib.Program, rng: Rand, *, tries: int = 32
) -> Scene | None:
  """A scene edit keeping the question well posed with another answer (check 3b).

  Tries every single edit (`_single_edits`) first, so the result does not depend on
  luck for the usual questions, then ``tries`` random multi-object edits.
  """
  answer, _ = q_lib.resolve(program, scene)
  for s in _single_edits(scene, program):
    got, _ = q_lib.resolve(program, s)
    if got is not None and got != answer:
      return s
  editable = [*sorted(program.capabilities), "counting"]
  for _ in range(tries):
    s = perturb(scene, [rng.choice(editable)], [], rng, tries=1)
    if s is None:
      continue
    got, _ = q_lib.resolve(program, s)
    if got is not None and got != answer:
      return s
  return None


def verify_question(
  scene: Scene,
  program: q_lib.Program,
  capabilities: Iterable[str],
  rng: np.random.Generator | Rand | None = None,
  *,
  quick: bool = False,
) -> VerificationReport:
  """Runs checks 1-3 (module docstring) for ``program`` labelled ``capabilities``.

  ``quick`` runs only the exact checks (well posed, 1, 3a), not the Monte Carlo
  ones (2, 3b): for screening, before a question is finally accepted.
  """
  rng = Rand.spawn(rng) if rng is not None else Rand(0)
  listed = frozenset(caps_lib.canonical(capabilities))
  text = q_lib.question_text(program)
  answer, why = q_lib.resolve(program, scene)
  report = VerificationReport(answer, text, {}, [], [])
  if answer is None:
    report.failures.append(f"not well posed: {why}")
    return report
  extra = program.capabilities - listed
  if extra:
    report.failures.append(f"program uses unlisted capabilities {sorted(extra)}")
  missing = listed - program.capabilities
  if missing:
    report.failures.append(f"listed capabilities {sorted(missing)} appear nowhere in the program")
  report.necessary = necessity(scene, program, answer)
  for cap, needed in report.necessary.items():
    if cap in listed and not needed:
      report.failures.append(f"{cap} is not necessary: the answer stays {answer!r} without it")
  report.superfluous = superfluous_constraints(scene, program, answer)
  if report.superfluous:
    report.failures.append(f"superfluous constraints {report.superfluous}")
  if answer_in_text(text, answer):
    report.failures.append(f"answer {answer!r} appears in the question")
  if report.failures or quick:
    return report  # the perturbation checks cost more; skip them for a rejected question
  report.failures += unlisted_changes(scene, program, listed, rng)
  if find_counterfactual(scene, program, rng) is None:
    report.failures.append("no scene edit changes the answer: predictable from the text")
  return report
