DROP TABLE partition_progress;
