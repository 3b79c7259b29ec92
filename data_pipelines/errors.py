"""Errors raised on bad data and the bookkeeping for skipped files.

Every problem with a user's corpus is reported with the offending path and what
was expected. With `skip_bad_files=True` the builders skip the bad example
instead, and a `SkippedFiles` record counts, prints and logs what was skipped.
"""

import collections
import dataclasses
import logging

_log = logging.getLogger(__name__)


class DataError(ValueError):
  """A file or example does not hold what the corpus layout requires."""


class BadAudioError(DataError):
  """A wav file is unreadable, empty, multichannel or at a wrong rate."""


class LengthMismatchError(DataError):
  """The files of one example (mixture, sources, noise) differ in length."""


class MissingDataError(FileNotFoundError):
  """A directory or file the corpus layout requires is absent."""


@dataclasses.dataclass
class SkippedFiles:
  """Examples skipped because of bad data, grouped by split."""

  dataset_name: str
  entries: dict[str, list[tuple[str, str]]] = dataclasses.field(
      default_factory=lambda: collections.defaultdict(list))

  def add(self, split: str, example_id: str, error: Exception) -> None:
    """Records one skipped example and logs why it was skipped."""
    self.entries[split].append((example_id, str(error)))
    _log.warning('%s/%s: skipping example %r: %s', self.dataset_name, split,
                 example_id, error)

  def count(self, split: str | None = None) -> int:
    """Number of skipped examples in `split` (all splits if None)."""
    if split is not None:
      return len(self.entries.get(split, ()))
    return sum(len(items) for items in self.entries.values())

  def report(self, split: str) -> str:
    """Prints and logs the number of skipped examples of `split`."""
    message = (f'{self.dataset_name}/{split}: skipped {self.count(split)} bad '
               'example(s) (skip_bad_files=True).')
    for example_id, reason in self.entries.get(split, ())[:10]:
      message += f'\n  {example_id}: {reason}'
    if self.count(split) > 10:
      message += f'\n  ... and {self.count(split) - 10} more (see the log).'
    print(message)
    _log.warning(message)
    return message

  def as_metadata(self) -> dict[str, list[list[str]]]:
    """Returns the skipped examples per split as JSON-serialisable lists."""
    return {split: [list(item) for item in items]
            for split, items in self.entries.items()}
