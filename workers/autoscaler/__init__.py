"""The autoscaler: HPA-style policies evaluated the moment a metric sample arrives, pulled
sources (Prometheus, JetStream backlogs) on an interval, scale to zero and back, and a scale
command, like any other caller's, for every change."""
