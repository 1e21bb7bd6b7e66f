//! Open archive files of one worker thread, least recently used closed first, so the
//! number of file descriptors stays bounded however many archives are used.

use std::fs::{File, OpenOptions};
use std::io;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use lru::LruCache;

pub struct Files {
    /// `Rc` so a file stays usable for the rest of an operation even if it is evicted
    /// meanwhile (it is closed when the operation drops it).
    open: LruCache<PathBuf, Rc<File>>,
}

impl Files {
    pub fn new(max_open: usize) -> Files {
        Files {
            open: LruCache::new(NonZeroUsize::new(max_open.max(4)).expect("max(4)")),
        }
    }

    /// The file, opened for reading and writing; `None` when it does not exist and
    /// `create` is false.
    pub fn open(&mut self, path: &Path, create: bool) -> io::Result<Option<Rc<File>>> {
        if let Some(f) = self.open.get(path) {
            return Ok(Some(f.clone()));
        }
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(path)
        {
            Ok(f) => Rc::new(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound && !create => return Ok(None),
            Err(e) => return Err(e),
        };
        self.open.put(path.to_owned(), file.clone());
        Ok(Some(file))
    }

    /// Like [`Files::open`] with `create`; never `None`.
    pub fn create(&mut self, path: &Path) -> io::Result<Rc<File>> {
        Ok(self.open(path, true)?.expect("created"))
    }

    /// Closes a file that was removed or replaced.
    pub fn forget(&mut self, path: &Path) {
        self.open.pop(path);
    }

    /// Closes every file under `dir`.
    pub fn forget_under(&mut self, dir: &Path) {
        let gone: Vec<PathBuf> = self
            .open
            .iter()
            .filter(|(p, _)| p.starts_with(dir))
            .map(|(p, _)| p.clone())
            .collect();
        for p in gone {
            self.open.pop(&p);
        }
    }

    pub fn clear(&mut self) {
        self.open.clear();
    }
}
