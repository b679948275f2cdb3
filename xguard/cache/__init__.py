"""The durable write-back cache that keeps VM writes safe while xapi is down."""
