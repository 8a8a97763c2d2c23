"""trimode.build"""
