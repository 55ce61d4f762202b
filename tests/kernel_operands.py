"""Where a weight's buffers go: into ``pallas_call`` in a jaxpr, into the kernel's custom call in HLO.

Used by the tests that check that a ``"rows"`` QArray weight reaches the matmul
kernel with no op over it (no transpose, pack, bitcast or convert) per call.
"""

from __future__ import annotations

import re

import jax
import jax.extend.core as jcore


# ---- jaxpr -----------------------------------------------------------------------------------
def _follow(jaxpr, tracked):
  """``(pallas operands, other ops)`` for the vars in ``tracked`` (var -> label), through calls.

  A var passes into a call (``pjit``, ``custom_vjp_call`` ...) as the matching
  inner invar; ``pallas_call`` is where it should end; any other equation that
  takes one is an op over the weight.
  """
  seen, others = [], []
  for eqn in jaxpr.eqns:
    ins = [v for v in eqn.invars if isinstance(v, jcore.Var) and v in tracked]
    if not ins:
      continue
    if eqn.primitive.name == "pallas_call":
      seen += [tracked[v] for v in ins]
      continue
    subs = [p for p in eqn.params.values() if isinstance(p, (jcore.Jaxpr, jcore.ClosedJaxpr))]
    if not subs:
      others.append(f"{eqn.primitive.name} on {[tracked[v] for v in ins]}")
      continue
    for sub in subs:
      inner = sub.jaxpr if isinstance(sub, jcore.ClosedJaxpr) else sub
      offset = len(inner.invars) - len(eqn.invars)  # leading consts, if any, are not operands
      inner_tracked = {inner.invars[i + offset]: tracked[v] for i, v in enumerate(eqn.invars)
                       if isinstance(v, jcore.Var) and v in tracked and i + offset >= 0}
      s, o = _follow(inner, inner_tracked)
      seen += s
      others += o
  return seen, others


def eqns_outside_kernels(jaxpr):
  """The equations of ``jaxpr`` and of the jaxprs nested in them (jit calls, custom rules ...), not looking
  inside Pallas kernels: what runs around the kernels."""
  for eqn in jaxpr.eqns:
    yield eqn
    if eqn.primitive.name != "pallas_call":
      for sub in jcore.jaxprs_in_params(eqn.params):
        yield from eqns_outside_kernels(sub)


def jaxpr_weight_path(fn, args, weight):
  """What ``jax.make_jaxpr(fn)(*args)`` does with ``weight``'s values and scales (leaves of ``args``).

  Returns ``(labels that reach a pallas_call, descriptions of other ops on them)``.
  """
  closed = jax.make_jaxpr(fn)(*args)
  ids = {id(weight.values): "values", id(weight.scales): "scales"}
  tracked = {v: ids[id(a)] for v, a in zip(closed.jaxpr.invars, jax.tree_util.tree_leaves(args)) if id(a) in ids}
  assert sorted(tracked.values()) == ["scales", "values"], "the weight's leaves are not inputs of fn"
  return _follow(closed.jaxpr, tracked)


# ---- optimized HLO ---------------------------------------------------------------------------
_COMP = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*->.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")


def _balanced(s: str, start: int) -> int:
  """Index just past the parenthesis group opening at ``s[start]``."""
  depth = 0
  for i in range(start, len(s)):
    depth += {"(": 1, ")": -1}.get(s[i], 0)
    if depth == 0:
      return i + 1
  raise ValueError(f"unbalanced parentheses in {s!r}")


def parse_hlo(text: str):
  """``{computation: [(name, shape, opcode, args, attrs)]}`` and the entry computation's name.

  ``args`` is the text inside the opcode's parentheses (operands, or a
  parameter's index), ``shape`` has its layouts stripped (``u8[384,256]``).
  """
  comps, entry, current = {}, None, None
  for line in text.splitlines():
    m = _COMP.match(line)
    if m:
      current = m.group(2)
      comps[current] = []
      entry = current if m.group(1) else entry
      continue
    if line.startswith("}"):
      current = None
      continue
    m = _INSTR.match(line) if current else None
    if not m:
      continue
    name, rest = m.groups()
    end = _balanced(rest, 0) if rest.startswith("(") else rest.index(" ")
    shape, rest = rest[:end], rest[end:].lstrip()
    op_end = rest.index("(")
    args_end = _balanced(rest, op_end)
    comps[current].append((name, re.sub(r"\{[^}]*\}", "", shape), rest[:op_end], rest[op_end + 1:args_end - 1],
                           rest[args_end:]))
  return comps, entry


def _operands(args: str) -> list[str]:
  return re.findall(r"%([\w.\-]+)", args)


def hlo_param_users(text: str, shapes) -> dict[str, list[str]]:
  """For each entry parameter whose shape is in ``shapes`` (e.g. ``"u8[384,256]"``), what reads it.

  Reads through ``call`` and ``async-start`` (XLA may wrap a kernel in a
  command-buffer or async computation): the callee's matching parameter's
  readers count, and through ``bitcast`` (a free reinterpretation of the
  buffer, unlike a ``bitcast-convert`` or a fusion). Anything else is reported
  as ``"<opcode> <name>"``, a custom call as ``"custom-call <target>"``.
  """
  comps, entry = parse_hlo(text)

  def params(comp):
    return {int(args): name for name, _, op, args, _ in comps[comp] if op == "parameter"}

  def readers(comp, name):
    found = []
    for iname, _, op, args, attrs in comps[comp]:
      operands = _operands(args)
      if name not in operands:
        continue
      if op in ("call", "async-start"):  # the callee reads it: follow into it
        callee = re.search(r"(?:to_apply|calls)=%?([\w.\-]+)", attrs).group(1)
        for pos, o in enumerate(operands):
          if o == name:
            found += readers(callee, params(callee)[pos])
      elif op == "bitcast":  # the same buffer under another shape: no kernel, no copy
        found += readers(comp, iname)
      elif op == "custom-call":
        target = re.search(r'custom_call_target="([^"]*)"', attrs)
        found.append(f"custom-call {target.group(1) if target else '?'}")
      else:
        found.append(f"{op} {iname}")
    return found

  return {name: readers(entry, name) for name, shape, op, _, _ in comps[entry]
          if op == "parameter" and shape in shapes}
