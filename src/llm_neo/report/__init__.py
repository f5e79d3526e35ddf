"""What people read: tables, and (for the comparison and the demo) reports. Import from the submodules."""
