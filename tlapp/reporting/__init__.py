"""What tlapp shows: text tables, plots, the augmentation preview grid."""
