"""The text values of the configuration: ``name=value`` lists and widths."""

from __future__ import annotations

import ast
import re


def parse_kwargs(text: str, what: str = "arguments") -> dict:
  """Parses ``"k=0.01,clip_norm=5,mode=sketch"`` into typed keyword arguments.

  Values are Python literals (ints, floats, booleans, None, tuples) where they
  parse as one, else strings.
  """
  out = {}
  # A comma starts a new pair only when a `name=` follows, so values may hold
  # commas themselves (caps=last_dense:0.25,first_conv:0.2).
  items = re.split(r",(?=\s*[A-Za-z_]\w*\s*=)", text)
  for item in filter(None, (t.strip() for t in items)):
    if "=" not in item:
      raise ValueError(f"bad {what} {item!r}: write name=value pairs separated "
                       "by commas, e.g. 'k=0.01,clip_norm=5'")
    name, value = (t.strip() for t in item.split("=", 1))
    try:
      out[name] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[name] = value
  return out


def parse_width(text: str):
  """``--model_width``: "" (the model's default), "100" or "100,100"."""
  text = text.strip()
  if not text:
    return None
  try:
    widths = tuple(int(w) for w in text.split(","))
  except ValueError:
    raise ValueError(f"--model_width must be integers separated by commas, "
                     f"got {text!r}") from None
  if any(w < 1 for w in widths):
    raise ValueError(f"--model_width entries must be >= 1, got {text!r}")
  return widths[0] if len(widths) == 1 and "," not in text else widths
