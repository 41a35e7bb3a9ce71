DROP TABLE partition_leases;
DROP TABLE workers;
