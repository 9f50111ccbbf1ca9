"""Answer extraction from response text: last \\boxed{}, last <answer> tags, or the final line."""

import re

BOXED_COMMANDS = ("\\boxed", "\\fbox")
ANSWER_FORMATS = ("boxed", "answer_tags", "last_line", "last_number")


def _braced_content(text: str, open_at: int) -> str | None:
  """Content of the brace group opening at text[open_at], or None when it never closes."""
  depth = 0
  for position in range(open_at, len(text)):
    char = text[position]
    if char == "{":
      depth += 1
    elif char == "}":
      depth -= 1
      if depth == 0:
        return text[open_at + 1:position]
  return None


def _box_at(text: str, start: int, command: str) -> str | None:
  """Content of the box whose command starts at text[start], or None when it is unclosed."""
  after = start + len(command)
  if text.startswith("{", after):
    return _braced_content(text, after)
  token = text[after:].lstrip(" ").split(maxsplit=1)
  return token[0].rstrip("$") if token else None


def _is_box(text: str, start: int, command: str) -> bool:
  """Whether the command at text[start] takes an argument (`{...}` or ` token`), not a bare word."""
  after = start + len(command)
  return text.startswith(("{", " "), after)


def last_boxed(text: str) -> str | None:
  """Content of the last `\\boxed{...}` (also `\\fbox{...}`, `\\boxed 5`), or None if absent.

  A bare command without an argument (`I used \\fbox.`, `\\boxedfoo`) is not a box and is
  skipped; an unclosed last box (a truncated response) gives None.
  """
  end = len(text)
  while True:
    start, command = max((text.rfind(c, 0, end), c) for c in BOXED_COMMANDS)
    if start < 0:
      return None
    if _is_box(text, start, command):
      return _box_at(text, start, command)
    end = start


def last_answer_tag(text: str, tag: str = "answer") -> str | None:
  """Stripped content of the last `<tag>...</tag>` pair, or None if absent."""
  close_at = text.rfind(f"</{tag}>")
  if close_at < 0:
    return None
  open_at = text.rfind(f"<{tag}>", 0, close_at)
  if open_at < 0:
    return None
  return text[open_at + len(tag) + 2:close_at].strip()


def last_line(text: str) -> str | None:
  """The last non-blank line, stripped, or None for a blank response."""
  for line in reversed(text.splitlines()):
    if line.strip():
      return line.strip()
  return None


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> str | None:
  """The last number (optional minus, digits with thousands commas, decimals), commas removed."""
  numbers = _NUMBER.findall(text[-10_000:])
  return numbers[-1].replace(",", "") if numbers else None


def extract_answer(text: str, answer_format: str) -> str | None:
  """The answer in `answer_format` (see ANSWER_FORMATS), or None if absent."""
  if answer_format == "boxed":
    return last_boxed(text)
  if answer_format == "answer_tags":
    return last_answer_tag(text)
  if answer_format == "last_line":
    return last_line(text)
  if answer_format == "last_number":
    return last_number(text)
  raise ValueError(f"Unknown answer_format {answer_format!r}; valid: {list(ANSWER_FORMATS)}")
