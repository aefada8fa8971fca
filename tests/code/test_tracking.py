"""Dataset lineage logged to a real MLflow SQLite store."""

from __future__ import annotations

import json
import warnings

import pandas as pd

from tasks.tracking import client, experiment_id, log_dataset, start_run


def test_curated_table_is_logged_as_its_dvc_object_without_warnings(mlflow_sqlite, tmp_path):
    table = tmp_path / "curated.parquet"
    pd.DataFrame({"text": ["a", "b"], "label": ["x", "y"]}).to_parquet(table)
    c = client()
    md5 = "0123456789abcdef0123456789abcdef"
    # a local DVC remote: the source is the remote's object; no remote: the table itself
    # (MLflow keeps one dataset per experiment, name and digest: each case gets its own experiment.)
    for remote, uri in ((str(tmp_path / "remote"), str(tmp_path / "remote" / "files" / "md5" / "01" / md5[2:])),
                        ("", str(table.resolve()))):
        run = start_run(c, experiment_id(c, f"t-{bool(remote)}"), "curate")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            log_dataset(c, run, table, "curated", md5, remote)
        assert not [w for w in caught if "interpreted in multiple ways" in str(w.message)]
        assert [json.loads(d.dataset.source)["uri"] for d in c.get_run(run).inputs.dataset_inputs] == [uri]
