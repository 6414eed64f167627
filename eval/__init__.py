"""Verification: metrics (pure numpy), targets (.bin sets, pair lists), extraction, reports.

Never trains.
"""
