"""The share protocol: folders, claims, heartbeats, submit and status. Imports no torch, so it starts fast."""
