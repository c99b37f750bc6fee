"""Development tooling (not shipped): the chart and CRD generated from code (`make manifests`)."""
