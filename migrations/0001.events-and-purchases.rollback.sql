DROP TABLE purchases;
DROP TABLE events;
