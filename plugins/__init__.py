"""trimode.plugins"""
