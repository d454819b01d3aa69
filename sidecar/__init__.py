"""Ingress enforcement sidecar: IP restrictions and MFA in front of an existing web console."""

__version__ = "0.1.0"
