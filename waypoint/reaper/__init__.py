"""reaper"""
