"""masml on a Dask cluster: the same commands, configs and bundles, on data that outgrows one process.

Why Dask and not a home-made engine: hospitals' platforms already run dask.distributed, and
``xgboost.dask`` trains the same boosters as single-node xgboost. Modules, in the order data flows:

* ``cluster``: connect (a LocalCluster, or ``tcp://SCHEDULER``) and run a job so that a lost worker
  ends it with a clear error instead of the hang xgboost's dask training is known for;
* ``data``: partitioned Parquet → validated canonical partitions on the workers, every problem of
  every partition reported at once, with the file and row it came from;
* ``train``: population, patient-level split and folds, features, tuning and the final booster;
* ``predict``: score partitioned Parquet through the bundle's ONNX graph inside each partition.
"""
