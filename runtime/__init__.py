"""trimode.runtime"""
