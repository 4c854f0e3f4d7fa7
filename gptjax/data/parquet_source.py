"""Pretraining documents from Parquet files, named `parquet:<glob>`: one document per row, from
the text column `data.text_field`.

Files are read in sorted order through pyarrow, row group after row group and that column alone,
so memory stays flat however large the files are. pyarrow is imported only when a Parquet source
is read: sources.py imports this module lazily, and the commands that read no Parquet never load it.
"""

from __future__ import annotations

import glob
import os

from gptjax.errors import UserError

# Rows read at once: memory stays flat, and per-row Python work stays small.
_BATCH_ROWS = 1024


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise UserError(f"data.source parquet:... needs pyarrow ({e}); install it with "
                        f"`pip install pyarrow`") from None
    return pa, pq


def parquet_files(pattern: str) -> list[str]:
    """The files `parquet:<pattern>` reads, in the order it reads them (also what
    sources.source_fingerprint watches)."""
    files = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        raise UserError(f"data.source parquet:{pattern} matches no files; check the path or quote the glob")
    return files


def _is_text_type(arrow_type) -> bool:
    import pyarrow as pa
    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or pa.types.is_string_view(arrow_type)


def _parquet_file(path: str):
    pa, pq = _pyarrow()
    try:
        return pq.ParquetFile(path)
    except pa.ArrowInvalid as e:
        raise UserError(f"{path} is not a Parquet file ({_first_line(e)}); fix data.source parquet:<glob> "
                        f"so that it matches Parquet files only") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or _first_line(e)}") from None


def _check_parquet_column(path: str, schema, field: str) -> None:
    if field not in schema.names:
        raise UserError(f"{path} has no column '{field}' (its columns: {', '.join(schema.names)}); set "
                        f"data.text_field to the column that holds the documents")
    kind = schema.field(field).type
    if not _is_text_type(kind):
        raise UserError(f"column '{field}' of {path} holds {kind}, not text; set data.text_field to the "
                        f"column that holds the documents")


def _parquet_batches(parquet, path: str, field: str):
    """Record batches of the text column alone, row group after row group (never the whole file)."""
    import pyarrow as pa
    batches = parquet.iter_batches(batch_size=_BATCH_ROWS, columns=[field])
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{path}: damaged Parquet data ({_first_line(e)})") from None
        yield batch


def iter_parquet_documents(pattern: str, field: str):
    """The non-blank, non-null values of column `field`, file by file in sorted order, then in
    stored row order."""
    for path in parquet_files(pattern):
        with _parquet_file(path) as parquet:
            # The column is checked to be text, so its values are str or None.
            _check_parquet_column(path, parquet.schema_arrow, field)
            for batch in _parquet_batches(parquet, path, field):
                yield from (text for text in batch.column(0).to_pylist() if text is not None and text.strip())


def parquet_documents(pattern: str, field: str) -> list[str]:
    return list(iter_parquet_documents(pattern, field))
