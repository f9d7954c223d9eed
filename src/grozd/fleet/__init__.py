"""fleet: a distributed init system that schedules systemd units onto cluster machines."""
