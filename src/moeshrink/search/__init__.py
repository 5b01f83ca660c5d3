"""Searches over compressed models scored by inference only (EEP)."""

from moeshrink.search.eep import EEPSettings, SearchResult, search

__all__ = ["EEPSettings", "SearchResult", "search"]
