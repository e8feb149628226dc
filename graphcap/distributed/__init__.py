"""Distributed: process groups, the capture-aware group coordinator, communicators."""
