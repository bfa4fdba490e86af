"""Preference-alignment training: the DPO/IPO/KTO losses and the SPO degree classifier heads."""
